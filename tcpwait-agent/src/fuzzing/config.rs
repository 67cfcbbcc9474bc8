//! The configuration loader (`Config::parse`: TOML text to a validated configuration, rules
//! included).
use crate::config::Config;

/// One file's text. Invariants: it is refused with a one-line message, or it validates, its
/// rules all convert (`RuleSet::rules` expects it), and it encodes back to TOML that parses to
/// the same configuration.
pub fn run(bytes: &[u8]) {
    // `Config::load` reads the file as UTF-8 and refuses anything else before parsing.
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    match Config::parse(text, "fuzz.toml") {
        Ok(config) => {
            config
                .validate("fuzz.toml")
                .expect("a parsed config is valid");
            let rules = config.rules.rules();
            assert_eq!(rules.len(), config.rules.0.len());
            let encoded = toml::to_string(&config).expect("a config encodes");
            let again = Config::parse(&encoded, "encoded.toml")
                .unwrap_or_else(|e| panic!("the encoded config is refused: {e}\n{encoded}"));
            assert_eq!(again, config, "{encoded}");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.contains('\n'), "{message:?}");
            assert!(message.starts_with("fuzz.toml"), "{message:?}");
        }
    }
}
