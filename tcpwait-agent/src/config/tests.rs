//! The configuration's parsing and validation: defaults, overrides, and the one-line errors.
use super::*;

#[test]
fn the_documented_file_is_the_default() {
    assert_eq!(
        Config::parse(DEFAULT_CONFIG, "default").expect("valid"),
        Config::default()
    );
    assert_eq!(
        Config::parse("", "empty").expect("valid"),
        Config::default()
    );
}

#[test]
fn the_default_rules_are_close_wait_leak_time_wait_pileup_and_fin_wait2_held() {
    use crate::tracker::rules::Rule;
    assert_eq!(
        Config::default().rules.rules(),
        vec![
            Rule::close_wait_leak(),
            Rule::time_wait_pileup(),
            Rule::fin_wait2_held()
        ]
    );
}

/// close_wait_leak's (age, count) in ns and sockets, as the tracker gets them.
fn close_wait_thresholds(c: &Config) -> (Option<u64>, Option<u32>) {
    let rules = c.rules.rules();
    let r = rules
        .iter()
        .find(|r| r.name == "close_wait_leak")
        .expect("close_wait_leak");
    (r.max_age_ns, r.max_count)
}

#[test]
fn the_older_rules_table_sets_close_wait_leak() {
    const S: u64 = 1_000_000_000;
    let c = Config::parse("[rules]\nclose_wait_age = 2\n", "t").expect("valid");
    assert_eq!(close_wait_thresholds(&c), (Some(2 * S), Some(100)));
    let c = Config::parse("[rules]\nclose_wait_age = \"1m 30s\"\n", "t").expect("valid");
    assert_eq!(close_wait_thresholds(&c), (Some(90 * S), Some(100)));
    let c = Config::parse("[rules]\nclose_wait_count = 7\n", "t").expect("valid");
    assert_eq!(close_wait_thresholds(&c), (Some(60 * S), Some(7)));
    assert_eq!(c.rules.rules().len(), 3);
}

#[test]
fn rules_tables_replace_the_defaults() {
    use crate::{event::TcpState, tracker::rules::Rule};
    let text = "[[rules]]\nname = \"syn_sent_stuck\"\nstate = \"syn-sent\"\nage = \"1s\"\n\n\
                [[rules]]\nname = \"many_fin_wait2\"\nstate = \"FIN_WAIT2\"\ncount = 5\n\
                alertname = \"PeerNeverCloses\"\nseverity = \"critical\"\nremedy = \"fix the peer\"\n";
    let c = Config::parse(text, "t").expect("valid");
    let syn_sent = Rule::new(
        "syn_sent_stuck",
        TcpState::SynSent,
        Some(1_000_000_000),
        None,
    );
    assert_eq!(syn_sent.alertname, "TcpSynSentStuck");
    let fin_wait2 = Rule {
        alertname: "PeerNeverCloses".into(),
        severity: "critical".into(),
        remedy: "fix the peer".into(),
        ..Rule::new("many_fin_wait2", TcpState::FinWait2, None, Some(5))
    };
    assert_eq!(c.rules.rules(), vec![syn_sent, fin_wait2]);
    // The close_wait_leak overrides (the flags) have no rule to set here.
    let mut rules = c.rules.clone();
    assert_eq!(
        rules.set_close_wait(Some(Dur(Duration::from_secs(1))), None),
        Err("no rule named close_wait_leak is configured: add it under [[rules]] or set the thresholds there".into())
    );
}

fn error(text: &str) -> String {
    Config::parse(text, "f.toml")
        .expect_err("invalid")
        .to_string()
}

#[test]
fn each_key_is_validated() {
    for (text, msg) in [
        (
            "[agent]\nmax_sockets = 0",
            "f.toml: agent.max_sockets: 0 is out of range: allowed 1 ..= 100000000",
        ),
        (
            "[agent]\nmax_sockets = \"many\"",
            "f.toml: agent.max_sockets: invalid type: string \"many\", expected u64",
        ),
        (
            "[agent]\nsocket = \"\"",
            "f.toml: agent.socket: \"\" is not a path: give the API socket's path",
        ),
        (
            "[agent]\nreconcile_interval = \"0.5s\"",
            "f.toml: agent.reconcile_interval: 500ms is out of range: allowed 1s ..= 1h",
        ),
        (
            "[rules]\nclose_wait_age = \"soon\"",
            "f.toml: rules.close_wait_age: invalid duration \"soon\" (expected number at 0): expected e.g. 60, \"90s\", \"5m\"",
        ),
        (
            "[rules]\nclose_wait_age = -1",
            "f.toml: rules.close_wait_age: invalid duration -1: expected a positive number of seconds or a string like \"90s\"",
        ),
        (
            "[rules]\nclose_wait_count = 0",
            "f.toml: rules.close_wait_count: 0 is out of range: allowed 1 ..= 10000000",
        ),
        (
            "[rules]\nclose_wait_count = -5",
            "f.toml: rules.close_wait_count: invalid value: integer `-5`, expected u32",
        ),
        (
            "[metrics]\nlisten = \"localhost\"",
            "f.toml: metrics.listen: \"localhost\" is not an address: allowed \"IP:PORT\" (e.g. \"127.0.0.1:9977\") or \"\" to disable",
        ),
        (
            "[metrics]\ntop_processes = 0",
            "f.toml: metrics.top_processes: 0 is out of range: allowed 1 ..= 10000",
        ),
        (
            "[alertmanager]\nurl = \"gopher://am:9093\"",
            "f.toml: alertmanager.url: \"gopher://am:9093\" is not supported: allowed an http:// or https:// URL (e.g. \"https://alertmanager.example:9093\") or \"\" to disable",
        ),
        (
            "[alertmanager]\nurl = \"https://am:9093\"\nca_file = \"/nonexistent/ca.pem\"",
            "f.toml: alertmanager.ca_file: \"/nonexistent/ca.pem\" cannot be read (No such file or directory (os error 2))",
        ),
        (
            "[alertmanager]\nurl = \"https://am:9093\"\nbearer_token_file = \"/dev/null\"",
            "f.toml: alertmanager.bearer_token_file: \"/dev/null\" is not a regular file",
        ),
        (
            "[webhook]\nbasic_auth_username = \"u\"",
            "f.toml: webhook.url: \"\" with credentials or a CA file set: give the receiver's URL, or remove them",
        ),
        (
            "[alertmanager]\ngenerator_url = \"grafana\"",
            "f.toml: alertmanager.generator_url: \"grafana\" is not an http:// or https:// URL: give one, or \"\" for none",
        ),
        (
            "[alertmanager]\nresend_interval = \"2h\"",
            "f.toml: alertmanager.resend_interval: 2h is out of range: allowed 1s ..= 1h",
        ),
        (
            "[alertmanager]\ninstance = 5",
            "f.toml: alertmanager.instance: invalid type: integer `5`, expected a string",
        ),
        (
            "[webhook]\nurl = \"ftp://x\"",
            "f.toml: webhook.url: \"ftp://x\" is not supported: allowed an http:// or https:// URL (e.g. \"https://alertmanager.example:9093\") or \"\" to disable",
        ),
        (
            "[webhook]\nurl = \"http://exa mple\"",
            "f.toml: webhook.url: \"http://exa mple\" is not supported: allowed an http:// or https:// URL (e.g. \"https://alertmanager.example:9093\") or \"\" to disable",
        ),
        (
            "[alertmanager]\nurl = \"http://:9093\"",
            "f.toml: alertmanager.url: \"http://:9093\" is not supported: allowed an http:// or https:// URL (e.g. \"https://alertmanager.example:9093\") or \"\" to disable",
        ),
        (
            "[alert_file]\npath = \"/tmp\"",
            "f.toml: alert_file.path: \"/tmp\" is a directory: give the path of a file",
        ),
        (
            "[transition_log]\npath = \"/nonexistent-dir/t.jsonl\"",
            "f.toml: transition_log.path: \"/nonexistent-dir/t.jsonl\" is in a directory that does not exist: create it first",
        ),
        (
            "[alert_file]\nmode = \"0666\"",
            "f.toml: alert_file.mode: \"0666\" is not allowed: allowed an octal mode within \"0644\" (no execute bit, no write for group or others), e.g. \"0600\" or \"0640\"",
        ),
        (
            "[transition_log]\nmode = \"rw\"",
            "f.toml: transition_log.mode: \"rw\" is not allowed: allowed an octal mode within \"0644\" (no execute bit, no write for group or others), e.g. \"0600\" or \"0640\"",
        ),
        (
            "[alert_file]\npath = 1",
            "f.toml: alert_file.path: invalid type: integer `1`, expected a string",
        ),
        (
            "[delivery]\nqueue_size = 0",
            "f.toml: delivery.queue_size: 0 is out of range: allowed 1 ..= 1000000",
        ),
        (
            "[delivery]\nmax_backoff = \"1ms\"",
            "f.toml: delivery.max_backoff: 1ms is out of range: allowed 100ms ..= 1h",
        ),
        (
            "[rules]\nclose_wait_age = \"50ms\"",
            "f.toml: rules.close_wait_age: 50ms is out of range: allowed 100ms ..= 30d",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"SYN_SNT\"\nage = 1",
            "f.toml: rules[0].state: \"SYN_SNT\" is not a TCP state: allowed ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"time_wait\"\ncount = 1",
            "f.toml: rules[0].state: \"TIME_WAIT\" cannot be watched (no process holds a TIME_WAIT socket: use scope = \"peer\"): allowed ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"CLOSE_WAIT\"\ncount = 1\n[[rules]]\nname = \"a\"\nstate = \"SYN_SENT\"\nage = 1",
            "f.toml: rules[1].name: \"a\" is already the name of rules[0]: allowed a name no other rule has",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"CLOSE_WAIT\"",
            "f.toml: rules[0]: has no threshold: set age, count or both",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"CLOSE_WAIT\"\ncount = 1\nscope = \"peer\"",
            "f.toml: rules[0].state: \"CLOSE_WAIT\" cannot be watched (a peer rule counts TIME_WAIT sockets only): allowed TIME_WAIT",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"TIME_WAIT\"\ncount = 1\nscope = \"host\"",
            "f.toml: rules[0].state: \"TIME_WAIT\" cannot be watched (the host-wide TIME_WAIT count is tcpwait_timewait_sockets; a rule on TIME_WAIT uses scope = \"peer\"): allowed ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"LISTEN\"\ncount = 1\nscope = \"host\"",
            "f.toml: rules[0].state: \"LISTEN\" cannot be watched (its sockets that predate the agent are not reconciled, so a host-wide count would be short): allowed ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"SYN_SENT\"\nscope = \"host\"",
            "f.toml: rules[0]: has no threshold: set age, count or both",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"SYN_SENT\"\ncount = 1\nscope = \"host\"\nshare = 0.5",
            "f.toml: rules[0].share: is a peer threshold: allowed only with scope = \"peer\"",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"CLOSE_WAIT\"\ncount = 1\nscope = \"pod\"",
            "f.toml: rules[0].scope: \"pod\" is not a scope: allowed \"process\", \"peer\" or \"host\"",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"TIME_WAIT\"\nscope = \"peer\"\nshare = 1.5",
            "f.toml: rules[0].share: 1.5 is out of range: allowed more than 0, at most 1 (0.5 = 50 %)",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"TIME_WAIT\"\nscope = \"peer\"\nage = 5",
            "f.toml: rules[0].age: is not a peer threshold (TIME_WAIT lasts 60 s): use count or share",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"TIME_WAIT\"\nscope = \"peer\"",
            "f.toml: rules[0]: has no threshold: set count, share or both",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"CLOSE_WAIT\"\nshare = 0.5",
            "f.toml: rules[0].share: is a peer threshold: allowed only with scope = \"peer\"",
        ),
        (
            "[[rules]]\nname = \"a b\"\nstate = \"CLOSE_WAIT\"\ncount = 1",
            "f.toml: rules[0].name: \"a b\" is not a rule name: allowed letters, digits, '_' and '-'",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"CLOSE_WAIT\"\ncount = 0",
            "f.toml: rules[0].count: 0 is out of range: allowed 1 ..= 10000000",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"CLOSE_WAIT\"\nage = \"50ms\"",
            "f.toml: rules[0].age: 50ms is out of range: allowed 100ms ..= 30d",
        ),
        (
            "[[rules]]\nname = \"a\"\nstate = \"CLOSE_WAIT\"\nage = 1\nthreshold = 3",
            "f.toml: rules[0].threshold: unknown field `threshold`, expected one of `name`, `state`, `scope`, `age`, `count`, `share`, `alertname`, `severity`, `remedy`",
        ),
        (
            "[[rules]]\nstate = \"CLOSE_WAIT\"\nage = 1",
            "f.toml: rules[0]: missing field `name`",
        ),
        (
            "[rules]\nclose_wait_agee = 5",
            "f.toml: rules.close_wait_agee: unknown field `close_wait_agee`, expected `close_wait_age` or `close_wait_count`",
        ),
        (
            "[nope]\n",
            "f.toml: nope: unknown field `nope`, expected one of `agent`, `rules`, `metrics`, `alertmanager`, `webhook`, `alert_file`, `delivery`, `transition_log`, `abort_rule`",
        ),
        (
            "[rules\n",
            "f.toml:1: invalid TOML: unclosed table, expected `]`",
        ),
    ] {
        assert_eq!(error(text), msg, "{text}");
        assert!(!error(text).contains('\n'));
    }
}

#[test]
fn file_modes_within_0644() {
    for (text, mode) in [
        ("0600", 0o600),
        ("640", 0o640),
        ("0644", 0o644),
        ("0400", 0o400),
    ] {
        assert_eq!(super::input::parse_mode(text), Some(mode), "{text}");
    }
    for text in ["0666", "0700", "0755", "00600", "600 ", "", "0o600", "0602"] {
        assert_eq!(super::input::parse_mode(text), None, "{text:?}");
    }
}
