//! The outgoing HTTP settings of a receiver (`[alertmanager]`, `[webhook]`): its URL, the CA
//! file trusted on top of the system's roots, and basic or bearer credentials read from files
//! (never from the command line, where `ps` shows them). Checked when the configuration is
//! read, so `config --check` refuses what delivery could not use; read again by delivery when
//! it starts (see `daemon::delivery::client`).
use std::{os::unix::fs::OpenOptionsExt as _, path::Path};

use rustls_pki_types::CertificateDer;

/// Largest CA or secret file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// One receiver's HTTP settings, borrowed from its table.
#[derive(Clone, Copy, Debug)]
pub struct Receiver<'a> {
    /// The table, e.g. `alertmanager` (for messages: `alertmanager.ca_file`).
    pub table: &'static str,
    /// `http://` or `https://` URL; "" disables the receiver.
    pub url: &'a str,
    /// PEM file of CA certificates trusted in addition to the system's; "" for none.
    pub ca_file: &'a str,
    /// Basic auth user name; "" for none.
    pub basic_auth_username: &'a str,
    /// File holding the basic auth password.
    pub basic_auth_password_file: &'a str,
    /// File holding a bearer token (`Authorization: Bearer …`).
    pub bearer_token_file: &'a str,
}

/// Credentials a receiver is sent, as configured (the secrets stay in their files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    None,
    Basic {
        username: String,
        password_file: String,
    },
    Bearer {
        token_file: String,
    },
}

impl Receiver<'_> {
    /// The credentials configured.
    pub fn auth(&self) -> Auth {
        if !self.bearer_token_file.is_empty() {
            Auth::Bearer {
                token_file: self.bearer_token_file.into(),
            }
        } else if !self.basic_auth_username.is_empty() {
            Auth::Basic {
                username: self.basic_auth_username.into(),
                password_file: self.basic_auth_password_file.into(),
            }
        } else {
            Auth::None
        }
    }

    /// Every key of the receiver; `Err((key, message))` names the first bad one.
    pub fn check(&self) -> Result<(), (String, String)> {
        let key = |k: &str| format!("{}.{k}", self.table);
        let url = self.url;
        let Some(scheme) = url_scheme(url) else {
            if url.is_empty() {
                let set = [
                    self.ca_file,
                    self.basic_auth_username,
                    self.basic_auth_password_file,
                    self.bearer_token_file,
                ];
                if set.iter().any(|v| !v.is_empty()) {
                    return Err((
                        key("url"),
                        "\"\" with credentials or a CA file set: give the receiver's URL, or remove them".into(),
                    ));
                }
                return Ok(());
            }
            return Err((
                key("url"),
                format!(
                    "\"{url}\" is not supported: allowed an http:// or https:// URL (e.g. \"https://alertmanager.example:9093\") or \"\" to disable"
                ),
            ));
        };
        if !self.ca_file.is_empty() {
            if scheme != "https" {
                return Err((
                    key("ca_file"),
                    format!(
                        "is set but the URL \"{url}\" is not https://: use https:// or remove ca_file"
                    ),
                ));
            }
            read_ca_file(Path::new(self.ca_file))
                .map_err(|e| (key("ca_file"), format!("\"{}\" {e}", self.ca_file)))?;
        }
        let basic = !self.basic_auth_username.is_empty();
        let password = !self.basic_auth_password_file.is_empty();
        if basic != password {
            let (k, missing) = if basic {
                ("basic_auth_username", "basic_auth_password_file")
            } else {
                ("basic_auth_password_file", "basic_auth_username")
            };
            return Err((
                key(k),
                format!("is set without {missing}: set both or neither"),
            ));
        }
        if basic && self.basic_auth_username.contains(':') {
            return Err((
                key("basic_auth_username"),
                format!(
                    "\"{}\" holds ':', which basic auth cannot carry in a user name",
                    self.basic_auth_username
                ),
            ));
        }
        if basic && !self.bearer_token_file.is_empty() {
            return Err((
                key("bearer_token_file"),
                "is set with basic_auth_username: a receiver takes one kind of credentials, remove one".into(),
            ));
        }
        for (k, path) in [
            ("basic_auth_password_file", self.basic_auth_password_file),
            ("bearer_token_file", self.bearer_token_file),
        ] {
            if path.is_empty() {
                continue;
            }
            read_secret(Path::new(path)).map_err(|e| (key(k), format!("\"{path}\" {e}")))?;
        }
        let credentials = basic || !self.bearer_token_file.is_empty();
        if credentials && scheme == "http" && !is_loopback(url) {
            return Err((
                key("url"),
                format!(
                    "\"{url}\" would carry the credentials in clear: use https:// (http:// is allowed with credentials only to a loopback address)"
                ),
            ));
        }
        Ok(())
    }
}

/// `http` or `https` when `url` is a usable URL of that scheme: it parses, has a host, and
/// holds no whitespace or control character (`http://exa mple` does not).
pub fn url_scheme(url: &str) -> Option<&'static str> {
    let uri = url.parse::<ureq::http::Uri>().ok()?;
    if uri.host().is_none_or(str::is_empty)
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return None;
    }
    match uri.scheme_str() {
        Some("http") => Some("http"),
        Some("https") => Some("https"),
        _ => None,
    }
}

/// Whether the URL's host is a loopback address (or `localhost`).
fn is_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<ureq::http::Uri>() else {
        return false;
    };
    let host = uri.host().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Reads a small regular file (a FIFO cannot hang the open, a device cannot exhaust memory).
fn read_small(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot be read ({e})"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot be read ({e})"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot be read ({e})"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("is over {MAX_FILE_BYTES} bytes"));
    }
    Ok(bytes)
}

/// The CA certificates of a PEM file: at least one, every PEM block a certificate.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject as _;
    let bytes = read_small(path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()),
        Err(e) => Err(format!("is not a PEM certificate file ({e})")),
    }
}

/// A secret from its file: the first line, without its line ending; it must be non-empty and
/// hold no control character (it goes into an HTTP header).
pub fn read_secret(path: &Path) -> Result<String, String> {
    let bytes = read_small(path)?;
    let text = String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_owned())?;
    let secret = text.strip_suffix('\n').unwrap_or(&text);
    let secret = secret.strip_suffix('\r').unwrap_or(secret);
    if secret.is_empty() {
        return Err("is empty: write the secret into it".into());
    }
    if secret.chars().any(char::is_control) {
        return Err(
            "holds a control character or more than one line: the file holds the secret alone"
                .into(),
        );
    }
    Ok(secret.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver<'a>(url: &'a str) -> Receiver<'a> {
        Receiver {
            table: "webhook",
            url,
            ca_file: "",
            basic_auth_username: "",
            basic_auth_password_file: "",
            bearer_token_file: "",
        }
    }

    #[test]
    fn secrets_are_one_line_without_its_ending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s");
        for (content, want) in [
            ("hunter2\n", Ok("hunter2")),
            ("hunter2\r\n", Ok("hunter2")),
            ("hunter2", Ok("hunter2")),
            ("\n", Err("is empty: write the secret into it")),
            (
                "a\nb\n",
                Err(
                    "holds a control character or more than one line: the file holds the secret alone",
                ),
            ),
        ] {
            std::fs::write(&p, content).expect("write");
            assert_eq!(
                read_secret(&p).as_deref(),
                want.map_err(str::to_owned).as_deref(),
                "{content:?}"
            );
        }
        assert_eq!(read_secret(dir.path()), Err("is not a regular file".into()));
    }

    #[test]
    fn credentials_need_https_unless_loopback() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken\n").expect("write");
        let token = token.to_str().expect("UTF-8");
        for (url, ok) in [
            ("https://am.example:9093", true),
            ("http://127.0.0.1:9093", true),
            ("http://[::1]:9093", true),
            ("http://localhost/hook", true),
            ("http://am.example:9093", false),
        ] {
            let r = Receiver {
                bearer_token_file: token,
                ..receiver(url)
            };
            assert_eq!(r.check().is_ok(), ok, "{url}: {:?}", r.check());
        }
        assert_eq!(
            Receiver {
                bearer_token_file: token,
                ..receiver("http://10.0.0.1/hook")
            }
            .check(),
            Err((
                "webhook.url".into(),
                "\"http://10.0.0.1/hook\" would carry the credentials in clear: use https:// (http:// is allowed with credentials only to a loopback address)".into()
            ))
        );
    }

    #[test]
    fn one_kind_of_credentials_and_both_halves_of_basic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "pw\n").expect("write");
        let pw = pw.to_str().expect("UTF-8");
        let https = "https://am:9093";
        let cases = [
            (
                Receiver {
                    basic_auth_username: "tcpwait",
                    ..receiver(https)
                },
                "webhook.basic_auth_username",
                "is set without basic_auth_password_file: set both or neither",
            ),
            (
                Receiver {
                    basic_auth_password_file: pw,
                    ..receiver(https)
                },
                "webhook.basic_auth_password_file",
                "is set without basic_auth_username: set both or neither",
            ),
            (
                Receiver {
                    basic_auth_username: "tcpwait",
                    basic_auth_password_file: pw,
                    bearer_token_file: pw,
                    ..receiver(https)
                },
                "webhook.bearer_token_file",
                "is set with basic_auth_username: a receiver takes one kind of credentials, remove one",
            ),
            (
                Receiver {
                    ca_file: pw,
                    ..receiver("http://127.0.0.1:9093")
                },
                "webhook.ca_file",
                "is set but the URL \"http://127.0.0.1:9093\" is not https://: use https:// or remove ca_file",
            ),
        ];
        for (r, key, message) in cases {
            assert_eq!(r.check(), Err((key.into(), message.into())), "{r:?}");
        }
        let ok = Receiver {
            basic_auth_username: "tcpwait",
            basic_auth_password_file: pw,
            ..receiver(https)
        };
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(
            ok.auth(),
            Auth::Basic {
                username: "tcpwait".into(),
                password_file: pw.into()
            }
        );
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate\n").expect("write");
        assert_eq!(
            read_ca_file(&p),
            Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into())
        );
        assert_eq!(
            read_ca_file(&dir.path().join("absent")),
            Err("cannot be read (No such file or directory (os error 2))".into())
        );
    }
}
