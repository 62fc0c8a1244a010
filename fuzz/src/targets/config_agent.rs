//! `agent.toml` parsing and validation (`AgentConfig::parse`).

use sigil_agent::config::AgentConfig;

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match AgentConfig::parse(text) {
        Ok(cfg) => {
            // Deterministic: the same text gives the same configuration.
            let again = AgentConfig::parse(text).expect("parses twice");
            assert_eq!(format!("{cfg:?}"), format!("{again:?}"));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
