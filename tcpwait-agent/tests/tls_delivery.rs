//! Alerts to a real Alertmanager behind TLS and basic auth (Alertmanager's own
//! `--web.config.file`: `tls_server_config` with a certificate from a CA this test makes,
//! `basic_auth_users` with a bcrypt hash), on loopback, from the real agent with a real
//! CLOSE_WAIT leak: the alert arrives with the right credentials; a wrong password is
//! refused, counted as failed, and named in one log line; a certificate the agent does not
//! trust is refused and counted, and nothing is sent in clear (a recording relay between the
//! two sees only TLS records).
mod common;

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{alertmanager::alertmanager, *};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

#[test]
#[ignore = "entry point of the peer processes this file's tests spawn, not a test"]
fn common_role_entry() {
    role_main();
}

const USER: &str = "tcpwait";
const PASSWORD: &str = "correct horse battery staple";

/// A CA, and a server certificate for 127.0.0.1 that it signed: (CA PEM, cert PEM, key PEM).
fn pki(name: &str) -> (String, String, String) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key")).expect("CA");
    let key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params")
        .signed_by(&key, &ca)
        .expect("server certificate");
    (ca.pem(), server.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// Alertmanager's own web configuration (`--web.config.file`): TLS only, with `cert` and
/// `key`; basic auth required, [`USER`] with [`PASSWORD`].
fn web_config(dir: &Path, cert: &Path, key: &Path) -> PathBuf {
    // Cost 4, bcrypt's minimum: the hash is checked per request, and the test needs no
    // strength, only the real check.
    let hash = bcrypt::hash(PASSWORD, 4).expect("bcrypt");
    write(
        dir,
        "web.yml",
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  {USER}: '{hash}'\n",
            cert.display(),
            key.display()
        ),
    )
}

/// The test's own client of Alertmanager: trusts the test CA, sends the right password.
struct AmClient {
    agent: ureq::Agent,
    base: String,
}

impl AmClient {
    fn new(ca_pem: &str, port: u16) -> Self {
        let ca = ureq::tls::Certificate::from_pem(ca_pem.as_bytes()).expect("CA PEM");
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&[ca]))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .into();
        Self {
            agent,
            base: format!("https://127.0.0.1:{port}"),
        }
    }

    fn get(&self, path: &str, password: &str) -> Result<String, ureq::Error> {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"));
        self.agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Basic {auth}"))
            .call()?
            .body_mut()
            .read_to_string()
    }

    /// Active alerts of `pid`.
    fn alerts(&self, pid: u32) -> Vec<Value> {
        let body = self.get("/api/v2/alerts", PASSWORD).unwrap_or_default();
        let all: Vec<Value> = serde_json::from_str(&body).unwrap_or_default();
        all.into_iter()
            .filter(|a| a["labels"]["pid"].as_str() == Some(pid.to_string().as_str()))
            .collect()
    }
}

/// `tcpwait_alert_deliveries_total{sink="alertmanager",result=…}` from the agent's metrics.
fn deliveries(metrics: u16, result: &str) -> u64 {
    let text = ureq::get(format!("http://127.0.0.1:{metrics}/metrics"))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default();
    let prefix =
        format!("tcpwait_alert_deliveries_total{{sink=\"alertmanager\",result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

/// The agent with `[alertmanager]` from `settings`, its metrics on a free port; a leak of 2
/// CLOSE_WAIT sockets fires `close_wait_leak` at 1 s.
fn agent(dir: &Path, name: &str, settings: &str) -> (Tcpwait, u16) {
    let metrics = free_port();
    let config = write(
        dir,
        &format!("{name}.toml"),
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\n[alertmanager]\n{settings}"),
    );
    let check = Command::new(env!("CARGO_BIN_EXE_tcpwait"))
        .args(["config", "--check"])
        .arg(&config)
        .output()
        .expect("config --check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let sock = api_socket(name);
    let tw = Tcpwait::start(
        &[
            "run",
            "--config",
            config.to_str().expect("UTF-8"),
            "--socket",
            &sock,
            "--close-wait-age",
            "1",
        ],
        AGENT_READY,
    );
    (tw, metrics)
}

/// A TCP relay from a free port to `to` that records every byte the client sent.
fn recording_relay(to: u16) -> (u16, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let record = sent.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let Ok(mut server) = TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            let index = {
                let mut all = record.lock().expect("lock");
                all.push(Vec::new());
                all.len() - 1
            };
            let (mut c2, mut s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
            let record = record.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = client.read(&mut buf) {
                    if n == 0 || server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    record.lock().expect("lock")[index].extend_from_slice(&buf[..n]);
                }
                let _ = server.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, sent)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
#[ignore = "needs root, the real kernel and Alertmanager; run by `cargo xtask test`"]
fn alerts_reach_alertmanager_over_tls_with_basic_auth_and_nothing_else_does() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (ca, cert, key) = pki("tcpwait");
    let ca_file = write(d, "ca.pem", &ca);
    let (cert, key) = (write(d, "server.pem", &cert), write(d, "server.key", &key));
    let password_file = write(d, "password", &format!("{PASSWORD}\n"));
    let wrong_file = write(d, "wrong", "Tr0ub4dor&3\n");
    let (rogue_ca, _, _) = pki("rogue");
    let rogue_file = write(d, "rogue-ca.pem", &rogue_ca);

    let am_port = free_port();
    let _am = alertmanager(d, am_port, Some(&web_config(d, &cert, &key)));
    let am = AmClient::new(&ca, am_port);
    assert!(
        wait_until(Duration::from_secs(20), || am
            .get("/-/ready", PASSWORD)
            .is_ok()),
        "Alertmanager (TLS, basic auth) never became ready"
    );
    // Alertmanager itself refuses a wrong password: the agent's refusal below is its answer.
    assert!(
        matches!(
            am.get("/-/ready", "Tr0ub4dor&3"),
            Err(ureq::Error::StatusCode(401))
        ),
        "Alertmanager does not check the password"
    );
    let url = format!("https://127.0.0.1:{am_port}");
    let generator = "https://grafana.example/d/tcpwait?var-host=node-1";

    // 1. The right password and the test CA: the alert arrives, with its generatorURL.
    let (mut tw, metrics) = agent(
        d,
        "tls-ok",
        &format!(
            "url = \"{url}\"\nca_file = \"{}\"\nbasic_auth_username = \"{USER}\"\nbasic_auth_password_file = \"{}\"\ngenerator_url = \"{generator}\"\n",
            ca_file.display(),
            password_file.display()
        ),
    );
    let (_srv, leaker) = leak("tw-tls-ok", 2);
    assert!(
        wait_until(Duration::from_secs(10), || !am
            .alerts(leaker.pid())
            .is_empty()),
        "the alert never reached Alertmanager; agent stderr: {:?}",
        tw.stderr.snapshot()
    );
    let alert = &am.alerts(leaker.pid())[0];
    assert_eq!(alert["labels"]["alertname"], "TcpCloseWaitLeak");
    assert_eq!(alert["labels"]["comm"], "tw-tls-ok");
    assert_eq!(alert["annotations"]["count"], "2");
    assert_eq!(alert["generatorURL"], generator);
    assert!(wait_until(Duration::from_secs(5), || deliveries(
        metrics, "sent"
    ) >= 1));
    assert_eq!(deliveries(metrics, "failed"), 0);
    eprintln!(
        "tls ok: alert for pid {} in Alertmanager, sent {}, failed 0",
        leaker.pid(),
        deliveries(metrics, "sent")
    );
    assert_eq!(tw.stop(libc::SIGTERM), 0);
    drop((_srv, leaker));

    // 2. A wrong password: Alertmanager answers 401; counted as failed, given up (a retry of
    //    the same credentials cannot succeed), one line in the log saying what to check. The
    //    agent sees every process of the host: a leak of another test run fires too, so the
    //    counts are compared with the refusals it logged, one line per change.
    let (tw, metrics) = agent(
        d,
        "tls-wrong",
        &format!(
            "url = \"{url}\"\nca_file = \"{}\"\nbasic_auth_username = \"{USER}\"\nbasic_auth_password_file = \"{}\"\n",
            ca_file.display(),
            wrong_file.display()
        ),
    );
    let (_srv2, refused) = leak("tw-tls-wrong", 2);
    assert!(
        wait_until(Duration::from_secs(10), || deliveries(metrics, "failed")
            >= 1),
        "no failed delivery counted; stderr: {:?}",
        tw.stderr.snapshot()
    );
    let reason = format!(
        "POST {url}/api/v2/alerts: 401 Unauthorized: the receiver refused the credentials: check alertmanager.basic_auth_username"
    );
    let lines: Vec<String> = tw
        .stderr
        .snapshot()
        .into_iter()
        .filter(|l| l.contains(&reason))
        .collect();
    assert!(!lines.is_empty(), "{:?}", tw.stderr.snapshot());
    assert_eq!(deliveries(metrics, "sent"), 0);
    let failed = deliveries(metrics, "failed");
    assert_eq!(
        failed,
        lines.len() as u64,
        "each refusal given up, not retried"
    );
    assert_eq!(deliveries(metrics, "dropped"), failed);
    assert!(
        lines[0].contains("alert change refused by the receiver; dropped"),
        "{}",
        lines[0]
    );
    assert!(
        !lines[0].contains("Tr0ub4dor"),
        "the password is never logged"
    );
    eprintln!(
        "tls wrong password: failed {failed}, dropped {failed}, log: {}",
        lines[0]
    );
    assert!(am.alerts(refused.pid()).is_empty());
    drop((tw, _srv2, refused));

    // 3. A CA that did not sign Alertmanager's certificate: the handshake fails, every attempt
    //    is counted, and nothing but TLS handshake records goes on the wire.
    let (relay, recorded) = recording_relay(am_port);
    let (tw, metrics) = agent(
        d,
        "tls-untrusted",
        &format!(
            "url = \"https://127.0.0.1:{relay}\"\nca_file = \"{}\"\nbasic_auth_username = \"{USER}\"\nbasic_auth_password_file = \"{}\"\n",
            rogue_file.display(),
            password_file.display()
        ),
    );
    let (_srv3, untrusted) = leak("tw-tls-rogue", 2);
    assert!(
        wait_until(Duration::from_secs(10), || deliveries(metrics, "failed")
            >= 3),
        "attempts not counted as failed; stderr: {:?}",
        tw.stderr.snapshot()
    );
    assert_eq!(deliveries(metrics, "sent"), 0);
    assert!(am.alerts(untrusted.pid()).is_empty());
    let tls_lines: Vec<String> = tw
        .stderr
        .snapshot()
        .into_iter()
        .filter(|l| l.contains("alert delivery failed; will retry"))
        .collect();
    assert!(
        tls_lines.iter().all(|l| l.contains("TLS: ")
            && l.contains("invalid peer certificate")
            && l.contains("nothing was sent")),
        "{tls_lines:?}"
    );
    assert!(tls_lines.len() >= 3, "{:?}", tw.stderr.snapshot());
    eprintln!("tls untrusted: {}", tls_lines[0]);
    let failed = deliveries(metrics, "failed");
    drop(tw);
    let connections = recorded.lock().expect("lock").clone();
    assert!(connections.len() >= 3, "{} connections", connections.len());
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    for (i, bytes) in connections.iter().enumerate() {
        // A TLS handshake record (content type 22, version 3.x) and nothing else in clear.
        assert_eq!(&bytes[..2], [0x16, 0x03], "connection {i} opened in clear");
        for secret in [
            basic.as_bytes(),
            PASSWORD.as_bytes(),
            b"POST",
            b"alertname",
            b"tw-tls-rogue",
        ] {
            assert!(
                !contains(bytes, secret),
                "connection {i} carried {:?} in clear",
                String::from_utf8_lossy(secret)
            );
        }
    }
    eprintln!(
        "tls untrusted: {} connections, {} bytes from the agent, all TLS records, failed {failed}",
        connections.len(),
        connections.iter().map(Vec::len).sum::<usize>(),
    );
}
