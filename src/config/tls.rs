//! TLS files named by the configuration (`delivery.ca_file`, an account's
//! `client_cert` / `client_key`, `broker.ca_file`, `broker.client_cert` /
//! `broker.client_key`): read and checked when the file is loaded, at start and on every
//! reload, and kept as PEM (docs/configuration.md, "TLS"). A missing, unreadable or
//! malformed file is an error naming the key, never the path's contents.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use super::ConfigError;
use super::validate::Validator;

/// Trusted CA certificates in addition to the system's, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CaFile {
    pem: Arc<[u8]>,
}

impl CaFile {
    /// The PEM text of the certificates.
    pub fn pem(&self) -> &[u8] {
        &self.pem
    }

    /// The certificates, for an HTTP client.
    pub fn certificates(&self) -> Vec<reqwest::Certificate> {
        reqwest::Certificate::from_pem_bundle(&self.pem).expect("checked when loaded")
    }
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CaFile")
    }
}

/// A client certificate chain and its private key, PEM, for servers that demand mTLS.
/// Two identities are equal when their files hold the same bytes; `Debug` never shows
/// the key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientIdentity {
    cert: Arc<[u8]>,
    key: Arc<[u8]>,
}

impl ClientIdentity {
    /// The certificate chain, PEM.
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert
    }

    /// The private key, PEM.
    pub fn key_pem(&self) -> &[u8] {
        &self.key
    }

    /// The identity for an HTTP client.
    pub fn reqwest(&self) -> reqwest::Identity {
        identity(&self.cert, &self.key).expect("checked when loaded")
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientIdentity")
    }
}

fn identity(cert: &[u8], key: &[u8]) -> Result<reqwest::Identity, reqwest::Error> {
    let mut pem = Vec::with_capacity(cert.len() + key.len() + 1);
    pem.extend_from_slice(key);
    pem.push(b'\n');
    pem.extend_from_slice(cert);
    reqwest::Identity::from_pem(&pem)
}

/// Reads `path` (relative to the configuration file's directory) for `key`.
fn read(
    v: &Validator,
    key: &str,
    account: Option<&str>,
    path: &str,
) -> Result<Arc<[u8]>, ConfigError> {
    if path.is_empty() {
        return Err(v.err(key, account, "is empty (omit it instead)"));
    }
    let path = match v.file.parent() {
        Some(dir) => dir.join(path),
        None => Path::new(path).to_path_buf(),
    };
    std::fs::read(&path).map(Arc::from).map_err(|e| {
        v.err(
            key,
            account,
            format!("cannot read the file: {}", io_reason(&e)),
        )
    })
}

/// An I/O error's reason without the path.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.kind().to_string(),
    }
}

/// The certificates of `path`, at least one.
fn certificates(
    v: &Validator,
    key: &str,
    account: Option<&str>,
    path: &str,
) -> Result<Arc<[u8]>, ConfigError> {
    let pem = read(v, key, account, path)?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(pem),
        _ => Err(v.err(key, account, "holds no PEM certificate")),
    }
}

/// `ca_file` of `section` (`delivery` or `broker`).
pub(super) fn ca_file(
    v: &Validator,
    key: &str,
    path: Option<&str>,
) -> Result<Option<CaFile>, ConfigError> {
    path.map(|path| {
        Ok(CaFile {
            pem: certificates(v, key, None, path)?,
        })
    })
    .transpose()
}

/// `client_cert` and `client_key` under `prefix` (`account` or `broker`): both or
/// neither.
pub(super) fn client_identity(
    v: &Validator,
    prefix: &str,
    account: Option<&str>,
    cert: Option<&str>,
    key: Option<&str>,
) -> Result<Option<ClientIdentity>, ConfigError> {
    let (cert_key, key_key) = (
        format!("{prefix}.client_cert"),
        format!("{prefix}.client_key"),
    );
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return Err(v.err(&key_key, account, format!("is required with {cert_key}")));
        }
        (None, Some(_)) => {
            return Err(v.err(&cert_key, account, format!("is required with {key_key}")));
        }
    };
    let cert = certificates(v, &cert_key, account, cert)?;
    let key = read(v, &key_key, account, key)?;
    if identity(&cert, &key).is_err() || !holds_private_key(&key) {
        return Err(v.err(
            &key_key,
            account,
            "holds no unencrypted PEM private key (PKCS#8, RSA or EC)",
        ));
    }
    Ok(Some(ClientIdentity { cert, key }))
}

fn holds_private_key(pem: &[u8]) -> bool {
    let text = String::from_utf8_lossy(pem);
    [
        "-----BEGIN PRIVATE KEY-----",
        "-----BEGIN RSA PRIVATE KEY-----",
        "-----BEGIN EC PRIVATE KEY-----",
    ]
    .iter()
    .any(|marker| text.contains(marker))
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{MINIMAL, parse_with};

    /// A file in a directory of its own, removed with it.
    fn temp_file(name: &str, text: &str) -> (std::path::PathBuf, String) {
        let dir =
            std::env::temp_dir().join(format!("courier-tls-unit-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path.to_str().unwrap().to_owned())
    }

    fn refused(text: &str) -> (String, String) {
        let e = parse_with(text, &[]).expect_err("refused");
        (e.key.clone(), e.to_string())
    }

    #[test]
    fn missing_empty_or_malformed_files_are_errors_naming_the_key() {
        let delivery =
            |line: &str| MINIMAL.replace("[broker]", &format!("[delivery]\n{line}\n[broker]"));
        let (key, text) = refused(&delivery("ca_file = \"/nonexistent/ca.pem\""));
        assert_eq!(key, "delivery.ca_file");
        assert!(
            text.contains("no such file") && !text.contains("/nonexistent"),
            "{text}"
        );
        assert_eq!(refused(&delivery("ca_file = \"\"")).0, "delivery.ca_file");
        let (dir, junk) = temp_file("junk.pem", "not a certificate\n");
        let (key, text) = refused(&delivery(&format!("ca_file = \"{junk}\"")));
        assert_eq!(key, "delivery.ca_file");
        assert!(text.contains("holds no PEM certificate"), "{text}");

        let account = |lines: &str| format!("{MINIMAL}\n{lines}\n");
        let (key, text) = refused(&account("client_cert = \"/etc/a.crt\""));
        assert_eq!(key, "account.client_key");
        assert!(text.contains("acme"), "names the account: {text}");
        assert_eq!(
            refused(&account("client_key = \"/etc/a.key\"")).0,
            "account.client_cert"
        );
        let (key, _) = refused(&account(&format!(
            "client_cert = \"{junk}\"\nclient_key = \"{junk}\""
        )));
        assert_eq!(key, "account.client_cert");
        let broker = |line: &str| MINIMAL.replace("[broker]", &format!("[broker]\n{line}"));
        assert_eq!(
            refused(&broker("ca_file = \"/nonexistent/ca.pem\"")).0,
            "broker.ca_file"
        );
        assert_eq!(
            refused(&broker("client_cert = \"/etc/c.pem\"")).0,
            "broker.client_key"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn x509_authentication_needs_amqps_and_a_client_certificate() {
        let with_url = |url: &str| MINIMAL.replace("amqp://guest:secretpw@127.0.0.1:5672/%2f", url);
        for url in [
            "amqp://127.0.0.1/%2f?auth_mechanism=external",
            "amqps://127.0.0.1/%2f?auth_mechanism=EXTERNAL",
        ] {
            let (key, text) = refused(&with_url(url));
            assert_eq!(key, "broker.url");
            assert!(
                text.contains("needs an amqps URL and broker.client_cert"),
                "{text}"
            );
        }
        let (key, text) = refused(&with_url("amqps://127.0.0.1/%2f?auth_mechanism=x509"));
        assert_eq!(key, "broker.url");
        assert!(text.contains("auth_mechanism=x509 is not one of"), "{text}");
        // A password login may name its mechanism.
        parse_with(
            &with_url("amqp://u:p@127.0.0.1/%2f?auth_mechanism=plain"),
            &[],
        )
        .expect("plain is a mechanism");
    }

    #[test]
    fn relative_paths_are_read_from_the_configuration_files_directory() {
        let (dir, _) = temp_file("ca.pem", "not a certificate\n");
        let text = MINIMAL.replace("[broker]", "[delivery]\nca_file = \"ca.pem\"\n[broker]");
        let e =
            crate::config::parse(&dir.join("courier.toml"), &text, &|_| None).expect_err("refused");
        // Found (and read) beside the file, whatever the working directory.
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
