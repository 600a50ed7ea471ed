//! The web configuration file (`tracer run --web-config FILE`), in the format of the Prometheus
//! exporter-toolkit, so that the file node_exporter reads, and the Prometheus scrape config that
//! goes with it, work here unchanged: TLS (`tls_server_config`), client certificates checked
//! against a CA, and HTTP basic authentication with bcrypt hashes (`basic_auth_users`).
//!
//! Owns: reading and checking the file (every key it does not implement is refused, never
//! ignored), building the TLS configuration, checking passwords. Does not own: serving
//! (`http`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// The file as written (exporter-toolkit's `web-configuration.md`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    http_server_config: Option<HttpFile>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
    max_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    /// Only `false` is accepted: the agent speaks HTTP/1.1, as Prometheus scrapes do.
    http2: Option<bool>,
    /// Headers added to every response.
    headers: Option<BTreeMap<String, String>>,
}

/// What the agent's server does with the file.
#[derive(Clone, Default)]
pub struct WebConfig {
    /// TLS, when `tls_server_config` is given: then plain HTTP is not served.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether a client certificate verified against `client_ca_file` is required.
    pub client_cert_required: bool,
    /// Users and their bcrypt hashes; empty = no authentication.
    pub users: Arc<Users>,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
}

impl WebConfig {
    /// Reads and checks `path`; every error is one line naming the file and what to fix.
    pub fn load(path: &Path) -> Result<WebConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --web-config {}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("--web-config {}", path.display()))
    }

    /// Parses the file's text; relative paths in it are taken from `dir` (the file's folder, as
    /// exporter-toolkit does).
    fn parse(text: &str, dir: &Path) -> Result<WebConfig> {
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| anyhow!("{e}"))?
        };
        let mut config = WebConfig::default();
        if let Some(tls) = file.tls_server_config {
            let (server, required) = tls.build(dir)?;
            config.tls = Some(Arc::new(server));
            config.client_cert_required = required;
        }
        if let Some(http) = file.http_server_config {
            if http.http2 == Some(true) {
                bail!("http_server_config.http2: true is not supported (the agent serves HTTP/1.1); remove it");
            }
            config.headers = http.headers.unwrap_or_default().into_iter().collect();
        }
        let users = file.basic_auth_users.unwrap_or_default();
        for (name, hash) in &users {
            hash.parse::<bcrypt::HashParts>().map_err(|e| {
                anyhow!("basic_auth_users.{name}: not a bcrypt hash ({e}); make one with `htpasswd -nBC 10 {name}`")
            })?;
        }
        config.users = Arc::new(Users {
            hashes: users,
            verified: Mutex::default(),
        });
        Ok(config)
    }
}

impl TlsFile {
    /// The rustls configuration, and whether a client certificate is required.
    fn build(self, dir: &Path) -> Result<(rustls::ServerConfig, bool)> {
        let at = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                dir.join(p)
            }
        };
        let (Some(cert_file), Some(key_file)) = (&self.cert_file, &self.key_file) else {
            bail!("tls_server_config needs both cert_file and key_file");
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(at(cert_file))
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| anyhow!("tls_server_config.cert_file {}: {e}", cert_file.display()))?;
        if certs.is_empty() {
            bail!(
                "tls_server_config.cert_file {}: no certificate in it",
                cert_file.display()
            );
        }
        let key = PrivateKeyDer::from_pem_file(at(key_file))
            .map_err(|e| anyhow!("tls_server_config.key_file {}: {e}", key_file.display()))?;
        let versions = versions(self.min_version.as_deref(), self.max_version.as_deref())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| anyhow!("tls_server_config: {e}"))?;
        let auth = self.client_auth_type.as_deref().unwrap_or("NoClientCert");
        let (builder, required) = match auth {
            "NoClientCert" => (builder.with_no_client_auth(), false),
            "VerifyClientCertIfGiven" | "RequireAndVerifyClientCert" => {
                let Some(ca_file) = &self.client_ca_file else {
                    bail!("tls_server_config.client_auth_type {auth} needs client_ca_file");
                };
                let mut roots = rustls::RootCertStore::empty();
                for ca in CertificateDer::pem_file_iter(at(ca_file)).map_err(|e| {
                    anyhow!(
                        "tls_server_config.client_ca_file {}: {e}",
                        ca_file.display()
                    )
                })? {
                    let ca = ca.map_err(|e| anyhow!("tls_server_config.client_ca_file: {e}"))?;
                    roots
                        .add(ca)
                        .map_err(|e| anyhow!("tls_server_config.client_ca_file: {e}"))?;
                }
                let required = auth == "RequireAndVerifyClientCert";
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                );
                let verifier = if required {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| anyhow!("tls_server_config.client_ca_file: {e}"))?;
                (builder.with_client_cert_verifier(verifier), required)
            }
            "RequestClientCert" | "RequireAnyClientCert" => bail!(
                "tls_server_config.client_auth_type {auth} (a certificate nobody verifies) is not \
                 supported: use RequireAndVerifyClientCert with client_ca_file"
            ),
            other => bail!(
                "tls_server_config.client_auth_type {other:?} is not one of NoClientCert, \
                 VerifyClientCertIfGiven, RequireAndVerifyClientCert"
            ),
        };
        let mut server = builder.with_single_cert(certs, key).map_err(|e| {
            anyhow!("tls_server_config: the key does not fit the certificate ({e})")
        })?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok((server, required))
    }
}

/// The protocol versions between `min` and `max` (`TLS12`, `TLS13`; default both).
fn versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>> {
    let rank = |v: Option<&str>, default: u8, key: &str| -> Result<u8> {
        match v {
            None => Ok(default),
            Some("TLS12") => Ok(2),
            Some("TLS13") => Ok(3),
            Some("TLS10" | "TLS11") => bail!(
                "tls_server_config.{key}: TLS 1.0 and 1.1 are not offered; use TLS12 or TLS13"
            ),
            Some(other) => bail!("tls_server_config.{key}: {other:?} is not TLS12 or TLS13"),
        }
    };
    let (lo, hi) = (rank(min, 2, "min_version")?, rank(max, 3, "max_version")?);
    if lo > hi {
        bail!("tls_server_config: min_version is above max_version");
    }
    Ok([(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
        .into_iter()
        .filter(|(v, _)| (lo..=hi).contains(v))
        .map(|(_, p)| p)
        .collect())
}

/// The users of `basic_auth_users`, and the credentials already verified.
///
/// bcrypt is slow on purpose (about 50 ms at cost 10): a scrape every few seconds must not pay
/// it each time, and the server thread must not stall on it. Like exporter-toolkit, a
/// credential that verified once is remembered (as its SHA-256, not the password); the cache
/// is bounded.
#[derive(Default)]
pub struct Users {
    hashes: BTreeMap<String, String>,
    verified: Mutex<HashSet<[u8; 32]>>,
}

/// Credentials remembered at most.
const VERIFIED_CACHE: usize = 64;

impl Users {
    /// True when no user is configured: no authentication.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Checks an `Authorization` header value (`Basic base64(user:password)`).
    pub fn check(&self, authorization: Option<&str>) -> bool {
        let Some(encoded) = authorization.and_then(|a| a.strip_prefix("Basic ")) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Some((user, password)) = std::str::from_utf8(&decoded)
            .ok()
            .and_then(|t| t.split_once(':'))
        else {
            return false;
        };
        let Some(hash) = self.hashes.get(user) else {
            return false;
        };
        let key = fingerprint(hash, &decoded);
        if self.verified.lock().is_ok_and(|v| v.contains(&key)) {
            return true;
        }
        if !bcrypt::verify(password, hash).unwrap_or(false) {
            return false;
        }
        if let Ok(mut v) = self.verified.lock() {
            if v.len() >= VERIFIED_CACHE {
                v.clear();
            }
            v.insert(key);
        }
        true
    }
}

/// SHA-256 of a hash and a credential: what the cache keeps instead of the password.
fn fingerprint(hash: &str, credential: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(hash.as_bytes());
    h.update([0]);
    h.update(credential);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_means_plain_http_and_no_users() {
        let c = WebConfig::parse("", Path::new(".")).unwrap();
        assert!(c.tls.is_none() && c.users.is_empty());
    }

    #[test]
    fn unknown_or_unsupported_keys_are_refused_not_ignored() {
        for (text, says) in [
            (
                "basic_auth_user:\n  a: b\n",
                "unknown field `basic_auth_user`",
            ),
            (
                "tls_server_config:\n  cipher_suites: [x]\n",
                "unknown field `cipher_suites`",
            ),
            ("http_server_config:\n  http2: true\n", "http2"),
            ("basic_auth_users:\n  alice: secret\n", "not a bcrypt hash"),
            (
                "tls_server_config:\n  cert_file: a.pem\n",
                "needs both cert_file and key_file",
            ),
        ] {
            let e = WebConfig::parse(text, Path::new(".")).err().expect(text);
            assert!(format!("{e:#}").contains(says), "{text}: {e:#}");
        }
    }

    #[test]
    fn basic_auth_accepts_the_password_and_nothing_else() {
        // Cost 4 keeps the test quick; the agent accepts any cost.
        let hash = bcrypt::hash("hunter2", 4).unwrap();
        let text = format!("basic_auth_users:\n  alice: '{hash}'\n");
        let c = WebConfig::parse(&text, Path::new(".")).unwrap();
        let basic = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        assert!(c.users.check(Some(&basic("alice:hunter2"))));
        assert!(
            c.users.check(Some(&basic("alice:hunter2"))),
            "again, from the cache"
        );
        assert!(!c.users.check(Some(&basic("alice:hunter3"))));
        assert!(!c.users.check(Some(&basic("bob:hunter2"))));
        assert!(!c.users.check(Some("Bearer x")));
        assert!(!c.users.check(None));
    }

    #[test]
    fn tls_versions_between_min_and_max() {
        assert_eq!(versions(None, None).unwrap().len(), 2);
        assert_eq!(versions(Some("TLS13"), None).unwrap().len(), 1);
        assert!(versions(Some("TLS13"), Some("TLS12")).is_err());
        assert!(versions(Some("TLS10"), None).is_err());
    }
}
