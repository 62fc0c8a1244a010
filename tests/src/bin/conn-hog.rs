//! Opens many idle Unix-socket connections (sending nothing) and reports
//! how many the other side has closed, for the resource-limit tests; run
//! as another uid through `setpriv`.
//!
//! `conn-hog SOCKET N` prints `opened N` once every connect succeeded (or
//! `connect-failed K <error>` after K), then `closed K` each time the count
//! of connections closed by the server changes. It exits when its stdin
//! closes, or when every connection is closed.

use std::io::{BufRead, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(n)) = (
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: conn-hog SOCKET N");
        return std::process::ExitCode::from(2);
    };
    // The parent ends the hog by closing our stdin.
    std::thread::spawn(|| {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            if line.is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    let mut out = std::io::stdout();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        match UnixStream::connect(path) {
            Ok(s) => {
                if s.set_nonblocking(true).is_err() {
                    return std::process::ExitCode::FAILURE;
                }
                conns.push(Some(s));
            }
            Err(e) => {
                let _ = writeln!(out, "connect-failed {i} {e}");
                break;
            }
        }
    }
    let _ = writeln!(out, "opened {}", conns.len());
    let _ = out.flush();
    let mut closed = 0;
    let mut buf = [0u8; 64];
    loop {
        for slot in conns.iter_mut() {
            let gone = match slot {
                Some(s) => match s.read(&mut buf) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                    Err(_) => true,
                },
                None => false,
            };
            if gone {
                *slot = None;
                closed += 1;
                let _ = writeln!(out, "closed {closed}");
                let _ = out.flush();
            }
        }
        if closed == conns.len() {
            return std::process::ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
