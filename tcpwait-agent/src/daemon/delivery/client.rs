//! One receiver's HTTP client: `http://` or `https://` (rustls; the system's roots plus the
//! receiver's `ca_file`), basic or bearer credentials read from their files at each request
//! (a rotated token is picked up without a restart), no redirects (a POST is not re-sent, and
//! credentials never follow one), and errors turned into one line that names the fix.
use std::{sync::Arc, time::Duration};

use base64::Engine as _;
use serde_json::Value;
use tracing::{debug, warn};
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

use super::Failed;
use crate::config::http::{Auth, Receiver, read_ca_file, read_secret, url_scheme};

/// Time for one request, connection and TLS handshake included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a receiver's client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA file went bad since the configuration was checked.
    #[error("{table}.ca_file: \"{path}\" {message}")]
    CaFile {
        table: &'static str,
        path: String,
        message: String,
    },
    /// An https:// receiver with nothing to verify it against.
    #[error(
        "{table}.url is https:// but no CA certificate is available: the system has none \
         (install ca-certificates, or set SSL_CERT_FILE) and {table}.ca_file is unset"
    )]
    NoRoots { table: &'static str },
}

/// A receiver's endpoint and how to reach it.
pub struct Client {
    table: &'static str,
    url: String,
    auth: Auth,
    agent: ureq::Agent,
}

impl Client {
    /// The client for `receiver`, posting to `url` (the receiver's URL, or a path below it).
    pub fn new(receiver: &Receiver<'_>, url: String) -> Result<Self, ClientError> {
        let https = url_scheme(receiver.url) == Some("https");
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .max_redirects(0)
            .https_only(https);
        if https {
            config = config.tls_config(tls_config(receiver)?);
        }
        Ok(Self {
            table: receiver.table,
            url,
            auth: receiver.auth(),
            agent: config.build().into(),
        })
    }

    /// POSTs `body` as JSON; 2xx is success, anything else a failure with its reason.
    pub fn post(&self, body: &Value) -> Result<(), Failed> {
        let fail = |error: String| Failed {
            error: format!("POST {}: {error}", self.url),
            permanent: false,
        };
        let mut request = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        match &self.auth {
            Auth::None => {}
            Auth::Basic {
                username,
                password_file,
            } => {
                let password = read_secret(password_file.as_ref()).map_err(|e| {
                    fail(format!(
                        "{}.basic_auth_password_file \"{password_file}\" {e}",
                        self.table
                    ))
                })?;
                let pair = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{password}"));
                request = request.header("Authorization", format!("Basic {pair}"));
            }
            Auth::Bearer { token_file } => {
                let token = read_secret(token_file.as_ref()).map_err(|e| {
                    fail(format!(
                        "{}.bearer_token_file \"{token_file}\" {e}",
                        self.table
                    ))
                })?;
                request = request.header("Authorization", format!("Bearer {token}"));
            }
        }
        match request.send(body.to_string()) {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(Failed {
                permanent: true,
                ..fail(format!(
                    "{}: redirects are not followed: set {}.url to where it points ({})",
                    r.status(),
                    self.table,
                    r.headers()
                        .get("location")
                        .and_then(|l| l.to_str().ok())
                        .unwrap_or("no Location")
                ))
            }),
            Err(ureq::Error::StatusCode(code)) => Err(Failed {
                permanent: super::is_permanent(code),
                ..fail(status_reason(self.table, code))
            }),
            Err(e) if is_tls(&e) => Err(fail(format!(
                "TLS: {e}: nothing was sent; if the receiver's certificate is signed by a \
                 private CA, add that CA to {}.ca_file",
                self.table
            ))),
            Err(e) => Err(fail(e.to_string())),
        }
    }
}

/// Whether the request failed in the TLS handshake (ureq reports rustls' verdict on the
/// certificate inside an I/O error).
fn is_tls(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) => true,
        ureq::Error::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()),
        _ => false,
    }
}

/// A refusal, with what to check.
fn status_reason(table: &str, code: u16) -> String {
    let name = ureq::http::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let hint = match code {
        401 => format!(
            ": the receiver refused the credentials: check {table}.basic_auth_username and \
             the password file, or {table}.bearer_token_file"
        ),
        403 => format!(": the credentials are not allowed to post alerts to {table}.url"),
        _ => String::new(),
    };
    format!("{code} {name}{hint}")
}

/// rustls with the system's roots and the receiver's CA file.
fn tls_config(receiver: &Receiver<'_>) -> Result<TlsConfig, ClientError> {
    let table = receiver.table;
    let system = rustls_native_certs::load_native_certs();
    for e in &system.errors {
        debug!(error = %e, "a system CA certificate source could not be read");
    }
    let mut roots: Vec<Certificate<'static>> = system
        .certs
        .iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let system_count = roots.len();
    if !receiver.ca_file.is_empty() {
        let extra =
            read_ca_file(receiver.ca_file.as_ref()).map_err(|message| ClientError::CaFile {
                table,
                path: receiver.ca_file.into(),
                message,
            })?;
        roots.extend(
            extra
                .iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned()),
        );
    }
    if roots.is_empty() {
        return Err(ClientError::NoRoots { table });
    }
    if system_count == 0 {
        warn!(
            receiver = table,
            "no system CA certificates found: only {table}.ca_file is trusted"
        );
    }
    Ok(TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_fix() {
        assert_eq!(
            status_reason("alertmanager", 401),
            "401 Unauthorized: the receiver refused the credentials: check \
             alertmanager.basic_auth_username and the password file, or \
             alertmanager.bearer_token_file"
        );
        assert_eq!(status_reason("webhook", 500), "500 Internal Server Error");
    }
}
