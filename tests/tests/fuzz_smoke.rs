//! The fuzz targets of `fuzz/` as a smoke in `cargo test`: the same target
//! code (`fuzz/src/targets/*.rs`, with the oracles' assertions) compiled in
//! the dev profile of the main workspace, without libFuzzer. For each target
//! every file of `fuzz/corpus/<target>/` goes through `run`, then a
//! deterministic mutation loop (a fixed-seed xorshift PRNG: bit flips, bytes
//! set to 0, 0xff or a random value, truncation, a duplicated slice, splices
//! of two corpus inputs) for a bounded budget: `SIGIL_FUZZ_SMOKE_SECS`
//! seconds (default 1.5) or `MAX_EXECS` mutated inputs, whichever comes
//! first.
//!
//! A panic fails the target's test, naming the target and the input (corpus
//! file, or which mutation of which file), printing its hex and saving it to
//! `target/fuzz-smoke/<target>-crash-<n>`, where it reproduces with the
//! libFuzzer bin as well (`fuzz/target/.../release/<target> FILE`).
//! Coverage-guided fuzzing stays `scripts/fuzz`.

use std::panic::catch_unwind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "../../fuzz/src/lib.rs"]
#[allow(
    unreachable_pub,
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "fuzz target code shared with fuzz/: its `pub` is for the libFuzzer bins, and its panics are the oracles"
)]
mod sigil_fuzz;

// The target modules name the shared helpers as `crate::…`, which in
// fuzz/ is the `sigil_fuzz` library and here this crate's root.
use sigil_fuzz::{CA_DER, JWKS, Splits, X509POP_ROOT, fixture_now, part, parts};

/// Mutated inputs per target at most, whatever the time budget.
const MAX_EXECS: u64 = 200_000;
/// Inputs grow to this size at most (duplication, splicing).
const MAX_LEN: usize = 64 * 1024;
/// Seed of every target's PRNG (mixed with the target's name).
const SEED: u64 = 0x5161_1f00_2a5e_ed01;

/// A fuzz target's entry point.
type Target = fn(&[u8]);

/// xorshift64: small, fixed-seed, so every run mutates the same way.
struct Rng(u64);

impl Rng {
    fn new(name: &str) -> Self {
        // FNV-1a of the name, so targets do not all draw the same numbers.
        let mut h = SEED;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Self(h | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-enough in `0..n`; 0 when `n` is 0.
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }
}

/// One to eight stacked mutations of `corpus[from]`.
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>], from: usize) -> Vec<u8> {
    let mut v = corpus[from].clone();
    for _ in 0..1 + rng.below(8) {
        let len = v.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = 0;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                v[i] = 0xff;
            }
            3 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.next() as u8;
            }
            4 => v.truncate(rng.below(len + 1)),
            5 if len > 0 => {
                // A copy of a slice inserted anywhere: repeated fields,
                // records and frames.
                let start = rng.below(len);
                let n = (1 + rng.below(len - start)).min(MAX_LEN.saturating_sub(len));
                let copy = v[start..start + n].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, copy);
            }
            6 => {
                // The head of this input, the tail of another.
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                let room = MAX_LEN.saturating_sub(v.len());
                let tail = &other[from..];
                v.extend_from_slice(&tail[..tail.len().min(room)]);
            }
            // Mutations of a byte drawn for an empty input: a random byte.
            _ => {
                if len < MAX_LEN {
                    v.push(rng.next() as u8);
                }
            }
        }
    }
    v
}

/// What a smoke run did.
#[derive(Debug)]
struct Stats {
    corpus_files: usize,
    mutated: u64,
    elapsed: Duration,
}

/// Runs `input`; on a panic, saves the input and describes it.
fn exec(name: &str, run: Target, n: u64, what: &str, input: &[u8]) -> Result<(), String> {
    let Err(payload) = catch_unwind(|| run(input)) else {
        return Ok(());
    };
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "(not a string)".into());
    let dir = crash_dir();
    let path = dir.join(format!("{name}-crash-{n}"));
    let saved = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, input))
        .map_or_else(
            |e| format!("NOT saved to {}: {e}", path.display()),
            |()| format!("saved to {}", path.display()),
        );
    Err(format!(
        "fuzz target {name}: input {n} ({what}, {} bytes) panicked: {msg}\n{saved}\nhex: {}",
        input.len(),
        hex::encode(input)
    ))
}

/// `target/fuzz-smoke/` of the target dir this test was built in.
fn crash_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("fuzz-smoke")
}

/// Time budget per target: `SIGIL_FUZZ_SMOKE_SECS` or 1.5 s.
fn budget() -> Duration {
    std::env::var("SIGIL_FUZZ_SMOKE_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_millis(1500), Duration::from_secs_f64)
}

/// Replays `corpus` (named by `names`) through `run`, then mutates it for
/// `budget` or `max_execs` inputs, whichever ends first.
fn smoke_with(
    name: &str,
    run: Target,
    names: &[String],
    corpus: &[Vec<u8>],
    budget: Duration,
    max_execs: u64,
) -> Result<Stats, String> {
    let start = Instant::now();
    let mut n = 0;
    for (file, input) in names.iter().zip(corpus) {
        exec(name, run, n, &format!("corpus file {file}"), input)?;
        n += 1;
    }
    let mut rng = Rng::new(name);
    let mut mutated = 0;
    let base = [Vec::new()];
    let pool = if corpus.is_empty() { &base[..] } else { corpus };
    let mutate_from = Instant::now();
    while mutated < max_execs && mutate_from.elapsed() < budget {
        let from = rng.below(pool.len());
        let input = mutate(&mut rng, pool, from);
        let what = format!(
            "mutation {mutated} of {}",
            names.get(from).map_or("the empty input", String::as_str)
        );
        exec(name, run, n, &what, &input)?;
        n += 1;
        mutated += 1;
    }
    Ok(Stats {
        corpus_files: corpus.len(),
        mutated,
        elapsed: start.elapsed(),
    })
}

/// The smoke of one target of `fuzz/` with its committed corpus.
fn smoke(name: &str, run: Target) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into())
        .collect();
    let corpus: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    match smoke_with(name, run, &names, &corpus, budget(), MAX_EXECS) {
        Ok(s) => println!(
            "fuzz smoke {name}: {} corpus files, {} mutated executions, {:.2} s",
            s.corpus_files,
            s.mutated,
            s.elapsed.as_secs_f64()
        ),
        Err(e) => panic!("{e}"),
    }
}

/// One `#[test]` per target, named as the target (so a failure names it),
/// and `TARGETS`, their names.
macro_rules! smoke_tests {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                smoke(stringify!($target), sigil_fuzz::targets::$target::run);
            }
        )*
        const TARGETS: &[&str] = &[$(stringify!($target)),*];
    };
}

smoke_tests!(
    bundle,
    config_agent,
    config_server,
    csr,
    duration,
    entry,
    h2_authority,
    jwt,
    selector,
    spiffe_id,
    svid_chain,
    sync,
    tpm,
    wit,
    x509pop,
);

/// Every bin of `fuzz/Cargo.toml` has a test here.
#[test]
fn every_fuzz_target_has_a_smoke_test() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/Cargo.toml"))
            .expect("fuzz/Cargo.toml");
    let mut bins: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "sigil-fuzz")
        .collect();
    bins.sort_unstable();
    let mut tested = TARGETS.to_vec();
    tested.sort_unstable();
    assert_eq!(tested, bins, "smoke tests vs fuzz/Cargo.toml bins");
}

/// The driver finds a panic that only a mutation reaches, fails naming the
/// target and saves an input that reproduces it.
#[test]
fn the_driver_reports_and_saves_a_crashing_input() {
    fn target(data: &[u8]) {
        assert!(!data.contains(&0xff), "a 0xff byte");
    }
    let corpus = vec![b"seed input".to_vec()];
    let names = vec!["seed".to_string()];
    let err = smoke_with(
        "driver-selftest",
        target,
        &names,
        &corpus,
        Duration::from_secs(10),
        10_000,
    )
    .expect_err("a 0xff byte is one mutation away");
    assert!(
        err.starts_with("fuzz target driver-selftest: input "),
        "{err}"
    );
    assert!(
        err.contains("mutation ") && err.contains("of seed"),
        "{err}"
    );
    assert!(err.contains("panicked: a 0xff byte"), "{err}");
    let path = err
        .lines()
        .find_map(|l| l.strip_prefix("saved to "))
        .expect("saved path");
    let saved = std::fs::read(path).expect("saved input");
    assert!(
        catch_unwind(|| target(&saved)).is_err(),
        "saved input panics"
    );
    let hex_line = err
        .lines()
        .find_map(|l| l.strip_prefix("hex: "))
        .expect("hex");
    assert_eq!(hex::decode(hex_line).ok(), Some(saved));
    // The clean corpus alone passes.
    let ok = smoke_with(
        "driver-selftest",
        target,
        &names,
        &corpus,
        Duration::ZERO,
        0,
    )
    .expect("no mutation, no panic");
    assert_eq!((ok.corpus_files, ok.mutated), (1, 0));
}
