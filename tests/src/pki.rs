//! Certificates for tests, made with rcgen: a CA that issues server and client
//! certificates.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// A certificate authority made for one test.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
}

impl Ca {
    /// A new CA whose certificate names `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            params,
            key: KeyPair::generate().unwrap(),
        }
    }

    /// The CA's own certificate (PEM).
    pub fn pem(&self) -> String {
        self.params.self_signed(&self.key).unwrap().pem()
    }

    /// Issues a certificate for `cn` (with `sans`, as DNS names or IP addresses); returns
    /// (certificate PEM, key PEM, certificate DER).
    pub fn issue(&self, cn: &str, sans: &[&str], expired: bool) -> (String, String, Vec<u8>) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params
            .signed_by(&key, &Issuer::from_params(&self.params, &self.key))
            .unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}
