//! Certificates a TLS test generates for itself with the `openssl` command: a CA, a
//! server certificate for 127.0.0.1 and localhost, one for another name, and two client
//! certificates (CN `courier-client` and `courier-stranger`), all signed by the CA (EC
//! P-256 keys, PKCS#8 PEM).

use std::path::PathBuf;
use std::process::Command;

use super::suffix;

/// A directory of generated certificates, removed when dropped.
pub struct TestCerts {
    pub dir: PathBuf,
}

/// Each certificate: its file stem and its extensions.
const LEAVES: [(&str, &str, &str); 4] = [
    (
        "server",
        "localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    ),
    (
        "other-name",
        "other.example",
        "subjectAltName=DNS:other.example\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    ),
    (
        "client",
        CLIENT_CN,
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    ),
    // Valid for the CA, but no broker user bears its name.
    (
        "stranger",
        "courier-stranger",
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    ),
];

/// The common name of the `client` certificate: the broker user it logs in as with
/// x509 authentication (`PrivateNode::add_certificate_user`).
pub const CLIENT_CN: &str = "courier-client";

impl TestCerts {
    /// Generates the CA and the four certificates (a fraction of a second).
    pub fn generate() -> Self {
        let dir = std::env::temp_dir().join(format!("courier-certs-{}", suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let certs = Self { dir };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        certs.openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=courier test CA",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        );
        for (stem, cn, extensions) in LEAVES {
            let ext = format!("{stem}.ext");
            std::fs::write(certs.dir.join(&ext), extensions).unwrap();
            let (key, csr, pem) = (
                format!("{stem}.key"),
                format!("{stem}.csr"),
                format!("{stem}.pem"),
            );
            let subject = format!("/CN={cn}");
            certs.openssl(
                &[
                    &["req"][..],
                    &ec,
                    &["-keyout", &key, "-out", &csr, "-subj", &subject],
                ]
                .concat(),
            );
            certs.openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ]);
        }
        certs
    }

    /// The path of a generated file: `ca.pem`, `server.pem`, `server.key`,
    /// `other-name.pem`, `client.pem`, `client.key`, `stranger.pem`, …
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The path as a string for a configuration file.
    pub fn file(&self, file: &str) -> String {
        self.path(file).to_str().unwrap().to_owned()
    }

    /// A rustls server configuration for `stem` (`server` or `other-name`); with
    /// `client_ca`, clients must present a certificate signed by the CA.
    pub fn server_config(&self, stem: &str, client_ca: bool) -> rustls::ServerConfig {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(self.path(&format!("{stem}.pem")))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(self.path(&format!("{stem}.key"))).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if client_ca {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(self.path("ca.pem")).unwrap() {
                roots.add(ca.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("the openssl command (scripts/ensure-rabbitmq.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
