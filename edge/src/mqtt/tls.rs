//! MQTT over TLS: the server's certificate and key, mutual TLS against a client CA, the
//! client's identity taken from its certificate, and reloading all of it on SIGHUP.
//!
//! The files are read into a complete rustls `ServerConfig`; each accepted connection
//! handshakes with the config current at its accept, so a reload changes what new
//! connections see and leaves open ones as they are. A reload that fails keeps the config
//! in use.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{CertIdentity, ListenerTls, TlsVersion};

/// A TLS setting of a listener that cannot be used: the key (within `[tls]` or the
/// `[[listeners]]` entry) and what to do about it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    /// The key whose file is at fault: `cert_file`, `key_file` or `client_ca_file`.
    pub key: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl TlsError {
    fn new(key: &'static str, message: impl Into<String>) -> TlsError {
        TlsError {
            key,
            message: message.into(),
        }
    }
}

/// Why a TLS connection ended before MQTT started.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The TLS handshake failed (the client's certificate was refused, no common version or
    /// cipher suite, not TLS at all...).
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    /// The client certificate was valid but does not carry the configured identity.
    #[error("client certificate refused: {0}")]
    Identity(String),
}

/// The TLS side of the listener: the settings in use and the files to read them again from.
pub struct TlsServer {
    /// The listener's key in the config (`tls`, `listeners[2]`), for the log.
    listener: String,
    config: ListenerTls,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsServer {
    /// Reads the files named by `config`, the TLS settings of the listener `listener`.
    pub fn new(listener: String, config: ListenerTls) -> Result<TlsServer, TlsError> {
        let server = server_config(&config)?;
        Ok(TlsServer {
            listener,
            config,
            current: RwLock::new(Arc::new(server)),
        })
    }

    /// The listener's key in the config (`tls`, `listeners[2]`).
    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// Reads the certificate, key and client CA files again; new handshakes use them. On
    /// error the settings in use stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let server = server_config(&self.config)?;
        *self.current.write().expect("tls config lock") = Arc::new(server);
        Ok(())
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn mutual(&self) -> bool {
        self.config.require_certificate
    }

    /// Runs the server side of the handshake; returns the stream and, with mutual TLS, the
    /// client's identity. The caller bounds the time it may take.
    pub async fn accept(
        &self,
        stream: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, Option<Arc<str>>), HandshakeError> {
        let acceptor = TlsAcceptor::from(self.current.read().expect("tls config lock").clone());
        let stream = acceptor.accept(stream).await.map_err(HandshakeError::Tls)?;
        if self.config.client_ca_file.is_none() {
            return Ok((stream, None));
        }
        // With `require_certificate` the verifier requires one, so a completed handshake has
        // it; without, a client that presents none authenticates as on any listener.
        let cert = match stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        {
            Some(cert) => cert,
            None if !self.mutual() => return Ok((stream, None)),
            None => return Err(HandshakeError::Identity("no client certificate".into())),
        };
        let user = client_identity(cert, self.config.identity).map_err(HandshakeError::Identity)?;
        Ok((stream, Some(Arc::from(user))))
    }
}

/// Builds the rustls settings from the files `config` names, checking that each file exists,
/// holds PEM of the right kind, and that the key belongs to the certificate.
pub fn server_config(config: &ListenerTls) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs("cert_file", &config.cert_file)?;
    let key = read_key(&config.key_file)?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match config.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::new("min_version", e.to_string()))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs("client_ca_file", path)? {
                roots.add(cert).map_err(|e| {
                    TlsError::new(
                        "client_ca_file",
                        format!(
                            "{}: a certificate in it is not a usable CA certificate ({e}); give the PEM of the CA that signs the client certificates",
                            path.display()
                        ),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if config.require_certificate {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::new("client_ca_file", format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder.with_single_cert(chain, key).map_err(|e| {
        let message = match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "{} is not the private key of the certificate in {}: give the key the certificate was issued for",
                config.key_file.display(),
                config.cert_file.display()
            ),
            e => format!(
                "{} cannot be used with {}: {e}",
                config.key_file.display(),
                config.cert_file.display()
            ),
        };
        TlsError::new("key_file", message)
    })
}

fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| {
        TlsError::new(
            key,
            format!(
                "cannot read {}: {e}; check the path and its permissions",
                path.display()
            ),
        )
    })
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError::new(
                key,
                format!(
                    "{} is not valid PEM ({e}); give PEM certificates",
                    path.display()
                ),
            )
        })?;
    if certs.is_empty() {
        return Err(TlsError::new(
            key,
            format!(
                "{} holds no certificate: give a PEM file with \"-----BEGIN CERTIFICATE-----\" sections",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("key_file", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        let why = match e {
            rustls::pki_types::pem::Error::NoItemsFound => "holds no private key".to_string(),
            e => format!("is not valid PEM ({e})"),
        };
        TlsError::new(
            "key_file",
            format!(
                "{} {why}: give the certificate's private key as PEM (\"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\")",
                path.display()
            ),
        )
    })
}

/// The client's name from its certificate (DER), as `identity` says.
pub fn client_identity(cert: &[u8], identity: CertIdentity) -> Result<String, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    let name = match identity {
        CertIdentity::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .map(|cn| {
                cn.as_str()
                    .map(str::to_string)
                    .map_err(|e| format!("its subject CN is not a string: {e}"))
            })
            .transpose()?,
        san => {
            let names = cert
                .subject_alternative_name()
                .map_err(|e| format!("its subjectAltName cannot be parsed: {e}"))?;
            names.and_then(|ext| {
                ext.value.general_names.iter().find_map(|n| match (san, n) {
                    (CertIdentity::SanDns, GeneralName::DNSName(s))
                    | (CertIdentity::SanEmail, GeneralName::RFC822Name(s))
                    | (CertIdentity::SanUri, GeneralName::URI(s)) => Some(s.to_string()),
                    _ => None,
                })
            })
        }
    };
    match name {
        Some(n) if !n.is_empty() => Ok(n),
        _ => Err(format!(
            "it has no {} (tls.identity = \"{}\")",
            match identity {
                CertIdentity::Cn => "subject Common Name",
                CertIdentity::SanDns => "DNS subjectAltName",
                CertIdentity::SanEmail => "e-mail subjectAltName",
                CertIdentity::SanUri => "URI subjectAltName",
            },
            identity_name(identity)
        )),
    }
}

fn identity_name(identity: CertIdentity) -> &'static str {
    match identity {
        CertIdentity::Cn => "cn",
        CertIdentity::SanDns => "san_dns",
        CertIdentity::SanEmail => "san_email",
        CertIdentity::SanUri => "san_uri",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };
    use std::path::PathBuf;

    fn ca() -> (CertificateParams, KeyPair) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        (params, KeyPair::generate().unwrap())
    }

    /// A certificate signed by the CA, with `cn` and `sans`; returns (PEM cert, PEM key, DER).
    fn issue(
        ca: &(CertificateParams, KeyPair),
        cn: Option<&str>,
        sans: Vec<SanType>,
    ) -> (String, String, Vec<u8>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&ca.0, &ca.1);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Files {
            Files {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn put(&self, name: &str, text: &str) -> PathBuf {
            let p = self.dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        }
    }

    fn tls_config(cert_file: PathBuf, key_file: PathBuf) -> ListenerTls {
        ListenerTls {
            cert_file,
            key_file,
            client_ca_file: None,
            require_certificate: false,
            identity: CertIdentity::Cn,
            min_version: TlsVersion::Tls12,
        }
    }

    fn server_files(f: &Files) -> ListenerTls {
        let ca = ca();
        let (cert, key, _) = issue(&ca, Some("localhost"), vec![]);
        tls_config(f.put("server.pem", &cert), f.put("server.key", &key))
    }

    #[test]
    fn certificate_and_key_from_pem_files_build_the_settings() {
        let f = Files::new();
        let mut config = server_files(&f);
        assert!(server_config(&config).is_ok());
        let ca = ca();
        let ca_pem = ca.0.self_signed(&ca.1).unwrap().pem();
        config.client_ca_file = Some(f.put("clients.pem", &ca_pem));
        assert!(server_config(&config).is_ok());
        config.min_version = TlsVersion::Tls13;
        assert!(server_config(&config).is_ok());
    }

    #[test]
    fn missing_certificate_file_is_named_with_the_fix() {
        let f = Files::new();
        let mut config = server_files(&f);
        config.cert_file = f.dir.path().join("nope.pem");
        let err = server_config(&config).unwrap_err();
        assert_eq!(err.key, "cert_file");
        assert!(err.message.contains("nope.pem"), "{err}");
        assert!(err.message.contains("check the path"), "{err}");
    }

    #[test]
    fn file_without_certificate_is_refused() {
        let f = Files::new();
        let mut config = server_files(&f);
        config.cert_file = f.put("empty.pem", "just some text\n");
        let err = server_config(&config).unwrap_err();
        assert_eq!(err.key, "cert_file");
        assert!(err.message.contains("holds no certificate"), "{err}");
    }

    #[test]
    fn broken_pem_is_refused() {
        let f = Files::new();
        let mut config = server_files(&f);
        config.cert_file = f.put(
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n",
        );
        let err = server_config(&config).unwrap_err();
        assert_eq!(err.key, "cert_file");
        assert!(err.message.contains("not valid PEM"), "{err}");
    }

    #[test]
    fn key_file_without_key_is_refused() {
        let f = Files::new();
        let mut config = server_files(&f);
        let cert = std::fs::read_to_string(&config.cert_file).unwrap();
        config.key_file = f.put("cert-as-key.pem", &cert);
        let err = server_config(&config).unwrap_err();
        assert_eq!(err.key, "key_file");
        assert!(err.message.contains("holds no private key"), "{err}");
    }

    #[test]
    fn key_of_another_certificate_is_refused() {
        let f = Files::new();
        let mut config = server_files(&f);
        config.key_file = f.put("other.key", &KeyPair::generate().unwrap().serialize_pem());
        let err = server_config(&config).unwrap_err();
        assert_eq!(err.key, "key_file");
        assert!(err.message.contains("is not the private key"), "{err}");
    }

    #[test]
    fn client_ca_file_without_certificate_is_refused() {
        let f = Files::new();
        let mut config = server_files(&f);
        config.client_ca_file = Some(f.put("ca.pem", ""));
        let err = server_config(&config).unwrap_err();
        assert_eq!(err.key, "client_ca_file");
    }

    #[test]
    fn failed_reload_keeps_the_settings_in_use() {
        let f = Files::new();
        let config = server_files(&f);
        let server = TlsServer::new("tls".into(), config.clone()).unwrap();
        let before = server.current.read().unwrap().clone();
        std::fs::write(&config.cert_file, "gone\n").unwrap();
        assert_eq!(server.reload().unwrap_err().key, "cert_file");
        assert!(Arc::ptr_eq(&before, &server.current.read().unwrap()));

        let (cert, key, _) = issue(&ca(), Some("renewed"), vec![]);
        std::fs::write(&config.cert_file, cert).unwrap();
        std::fs::write(&config.key_file, key).unwrap();
        server.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &server.current.read().unwrap()));
    }

    #[test]
    fn identity_is_the_common_name_or_the_chosen_san() {
        let (_, _, der) = issue(
            &ca(),
            Some("sensor-17"),
            vec![
                SanType::IpAddress("10.0.0.1".parse().unwrap()),
                SanType::DnsName("s17.plant.example".try_into().unwrap()),
                SanType::Rfc822Name("ops@plant.example".try_into().unwrap()),
                SanType::URI("spiffe://plant/sensor/17".try_into().unwrap()),
            ],
        );
        assert_eq!(
            client_identity(&der, CertIdentity::Cn).unwrap(),
            "sensor-17"
        );
        assert_eq!(
            client_identity(&der, CertIdentity::SanDns).unwrap(),
            "s17.plant.example"
        );
        assert_eq!(
            client_identity(&der, CertIdentity::SanEmail).unwrap(),
            "ops@plant.example"
        );
        assert_eq!(
            client_identity(&der, CertIdentity::SanUri).unwrap(),
            "spiffe://plant/sensor/17"
        );
    }

    #[test]
    fn certificate_without_the_identity_is_refused() {
        let (_, _, der) = issue(
            &ca(),
            None,
            vec![SanType::DnsName("only-dns".try_into().unwrap())],
        );
        let err = client_identity(&der, CertIdentity::Cn).unwrap_err();
        assert!(err.contains("no subject Common Name"), "{err}");
        assert!(err.contains("tls.identity = \"cn\""), "{err}");
        let err = client_identity(&der, CertIdentity::SanEmail).unwrap_err();
        assert!(err.contains("no e-mail subjectAltName"), "{err}");
        assert_eq!(
            client_identity(&der, CertIdentity::SanDns).unwrap(),
            "only-dns"
        );
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let err = client_identity(b"\x30\x03abc", CertIdentity::Cn).unwrap_err();
        assert!(err.contains("cannot be parsed"), "{err}");
    }
}
