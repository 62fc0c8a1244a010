//! `server.toml` parsing and validation (`ServerConfig::parse`), with its
//! datastore, attestation and federation sections.

use sigil_server::config::ServerConfig;

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ServerConfig::parse(text) {
        Ok(cfg) => {
            let again = ServerConfig::parse(text).expect("parses twice");
            assert_eq!(format!("{cfg:?}"), format!("{again:?}"));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
