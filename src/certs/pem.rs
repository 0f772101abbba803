//! PEM bundles and the facts about a certificate the tools and the TLS verifier need.
//!
//! The server's client-certificate verifier and the `add-client`/`list-clients`/
//! `remove-client` tools parse `authorized.crt` with this one parser, so what the tools
//! accept is exactly what the server loads.

use sha2::{Digest, Sha256};
use std::io::Cursor;
use std::ops::Range;
use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer, X509Certificate};

/// One PEM block of a file, with the bytes it occupies.
#[derive(Debug, Clone)]
pub struct PemBlock {
    /// The label after `BEGIN `, e.g. `CERTIFICATE` or `PRIVATE KEY`.
    pub label: String,
    /// The decoded contents.
    pub der: Vec<u8>,
    /// The block's bytes in the file, from its `BEGIN` line through the end of its `END`
    /// line, extended back over `#` comment lines directly above it (where add-client
    /// writes the subject), so that removing a span removes an entry's annotation with
    /// it while any other text in the file stays.
    pub span: Range<usize>,
}

/// Splits `data` into its PEM blocks. Text outside blocks is allowed (RFC 7468
/// explanatory text, which OpenSSL also skips); a truncated or undecodable block is an
/// error, because a file being half-written must not be mistaken for a shorter list.
pub fn blocks(data: &[u8]) -> Result<Vec<PemBlock>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let rest = &data[pos..];
        match Pem::read(Cursor::new(rest)) {
            Ok((pem, used)) => {
                let begin = pos + begin_line(rest);
                out.push(PemBlock {
                    label: pem.label,
                    der: pem.contents,
                    span: comments_above(data, pos, begin)..pos + used,
                });
                pos += used;
            }
            // Only text (or nothing) after the last block.
            Err(x509_parser::error::PEMError::MissingHeader) => break,
            Err(e) => {
                let line = 1 + data[..pos].iter().filter(|&&b| b == b'\n').count();
                let what = match e {
                    x509_parser::error::PEMError::IncompletePEM => {
                        "a PEM block is not terminated (file truncated or still being written?)"
                            .to_string()
                    }
                    x509_parser::error::PEMError::Base64DecodeError => {
                        "a PEM block is not valid base64 (encrypted or corrupted?)".to_string()
                    }
                    other => format!("malformed PEM: {other}"),
                };
                return Err(format!("{what} (after line {line})"));
            }
        }
    }
    Ok(out)
}

/// Offset of the first line starting with `-----BEGIN ` (what `Pem::read` looks for).
fn begin_line(data: &[u8]) -> usize {
    let mut at = 0;
    while at < data.len() {
        if data[at..].starts_with(b"-----BEGIN ") {
            return at;
        }
        match data[at..].iter().position(|&b| b == b'\n') {
            Some(nl) => at += nl + 1,
            None => break,
        }
    }
    0
}

/// Start of the run of `#` lines that ends right at `begin`, not going before `floor`.
fn comments_above(data: &[u8], floor: usize, begin: usize) -> usize {
    let mut start = begin;
    while start > floor {
        // The line that ends just before `start`.
        let line_end = start - 1;
        let line_start = data[floor..line_end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(floor, |i| floor + i + 1);
        if data.get(line_start) != Some(&b'#') {
            break;
        }
        start = line_start;
    }
    start
}

/// Whether a PEM label names private key material.
pub fn is_private_key_label(label: &str) -> bool {
    label.ends_with("PRIVATE KEY")
}

/// Encodes DER as a PEM block with 64-column lines.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Lower-case hex SHA-256 of a certificate's DER encoding: the same value as
/// `openssl x509 -noout -fingerprint -sha256`, without the colons.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Normalises a fingerprint typed by a user (any case, with or without colons, with or
/// without a `sha256:`/`SHA256 Fingerprint=` prefix). `None` if it is not hex.
pub fn normalize_fingerprint(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s.rsplit_once('=').map_or(s, |(_, v)| v);
    let s = s
        .strip_prefix("sha256:")
        .or_else(|| s.strip_prefix("SHA256:"))
        .unwrap_or(s);
    let hex: String = s.chars().filter(|&c| c != ':').collect();
    (!hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// Where a point in time falls relative to a certificate's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    NotYetValid,
    Valid,
    Expired,
}

/// What the tools and the verifier need to know about one certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub der: Vec<u8>,
    /// RFC 4514-style subject, e.g. `CN=client`, with control characters replaced so it
    /// is safe to print and to write into a comment line.
    pub subject: String,
    /// See [`fingerprint`].
    pub sha256: String,
    /// The DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// e.g. `ECDSA P-256`, `RSA 4096`.
    pub key: String,
}

impl CertInfo {
    /// Parses and checks a DER certificate: it must be well-formed X.509 (as judged both
    /// by x509-parser and by the parser rustls verifies signatures with) and carry a key
    /// type the server can verify handshake signatures for.
    pub fn from_der(der: &[u8]) -> Result<CertInfo, String> {
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
        if !rest.is_empty() {
            return Err("not a valid X.509 certificate: trailing data".into());
        }
        let owned = rustls_pki_types::CertificateDer::from(der.to_vec());
        rustls::server::ParsedCertificate::try_from(&owned)
            .map_err(|e| format!("certificate not usable for TLS: {e}"))?;
        let key = key_description(&cert)?;
        let validity = cert.validity();
        Ok(CertInfo {
            der: der.to_vec(),
            subject: printable(&cert.subject().to_string()),
            sha256: fingerprint(der),
            spki: cert.tbs_certificate.subject_pki.raw.to_vec(),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            key,
        })
    }

    pub fn validity_at(&self, unix_secs: i64) -> Validity {
        if unix_secs < self.not_before {
            Validity::NotYetValid
        } else if unix_secs > self.not_after {
            Validity::Expired
        } else {
            Validity::Valid
        }
    }

    pub fn validity_now(&self) -> Validity {
        self.validity_at(now_unix())
    }

    /// Display form of the subject: `(empty subject)` rather than nothing.
    pub fn subject_display(&self) -> &str {
        if self.subject.is_empty() {
            "(empty subject)"
        } else {
            &self.subject
        }
    }
}

/// The key types the ring provider can verify handshake signatures with.
fn key_description(cert: &X509Certificate<'_>) -> Result<String, String> {
    use x509_parser::public_key::PublicKey;
    let spki = &cert.tbs_certificate.subject_pki;
    let oid = spki.algorithm.algorithm.to_id_string();
    if oid == "1.3.101.112" {
        return Ok("Ed25519".into());
    }
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= 2048 => Ok(format!("RSA {}", rsa.key_size())),
        Ok(PublicKey::RSA(rsa)) => Err(format!(
            "RSA key of {} bits is too small (at least 2048 are needed)",
            rsa.key_size()
        )),
        Ok(PublicKey::EC(ec)) if matches!(ec.key_size(), 256 | 384) => {
            Ok(format!("ECDSA P-{}", ec.key_size()))
        }
        Ok(PublicKey::EC(ec)) => Err(format!(
            "unsupported elliptic curve ({} bits); use P-256 or P-384",
            ec.key_size()
        )),
        _ => Err(format!(
            "unsupported public key algorithm {oid}; use RSA, ECDSA P-256/P-384 or Ed25519"
        )),
    }
}

/// Replaces control characters (a subject may contain newlines) so that printing a
/// subject, or writing it into a comment line of a PEM file, cannot forge extra lines.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `2035-01-01 12:00 UTC`.
pub fn format_time(unix_secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix_secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => format!("@{unix_secs}"),
    }
}

/// One certificate of a bundle, with its place in the file.
#[derive(Debug, Clone)]
pub struct BundleEntry {
    pub info: CertInfo,
    pub span: Range<usize>,
}

/// Parses a bundle of certificates (`--client-certs`, `authorized.crt`). Every block must
/// be a valid certificate; private keys are refused outright, since a key in a file of
/// public certificates means something was copied by mistake. An empty file (or one with
/// only text) is a valid, empty bundle that authorizes nobody; binary data is an error,
/// so that a DER file is not silently read as an empty list.
pub fn parse_bundle(data: &[u8]) -> Result<Vec<BundleEntry>, String> {
    let blocks = blocks(data)?;
    if blocks.is_empty() && (data.contains(&0) || std::str::from_utf8(data).is_err()) {
        return Err(
            "not a PEM file (binary data; convert DER with openssl x509 -inform der)".into(),
        );
    }
    let mut out = Vec::new();
    for (i, block) in blocks.into_iter().enumerate() {
        let n = i + 1;
        if is_private_key_label(&block.label) {
            return Err(format!(
                "block {n} is a private key ({}), not a certificate",
                block.label
            ));
        }
        if block.label != "CERTIFICATE" {
            return Err(format!(
                "block {n} is a {:?}, not a CERTIFICATE",
                block.label
            ));
        }
        let info = CertInfo::from_der(&block.der).map_err(|e| format!("block {n}: {e}"))?;
        out.push(BundleEntry {
            info,
            span: block.span,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(cn: &str) -> (String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), cert.der().to_vec())
    }

    #[test]
    fn base64_matches_decoder() {
        for len in 0..70 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let pem = encode("CERTIFICATE", &data);
            if len == 0 {
                continue;
            }
            let b = blocks(pem.as_bytes()).unwrap();
            assert_eq!(b.len(), 1);
            assert_eq!(b[0].der, data, "length {len}");
        }
    }

    #[test]
    fn spans_cover_leading_text() {
        let (a, _) = self_signed("a");
        let (b, _) = self_signed("b");
        let file = format!("# first\n{a}\n# second\n{b}trailing\n");
        let entries = parse_bundle(file.as_bytes()).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].info.subject, "CN=a");
        assert!(file[entries[0].span.clone()].starts_with("# first"));
        assert!(file[entries[1].span.clone()].starts_with("# second"));
        // Text that is not a comment directly above a block belongs to no entry.
        let file = format!("notes\n{a}trailing\n# mine\n# too\n{b}");
        let entries = parse_bundle(file.as_bytes()).unwrap();
        assert!(file[entries[0].span.clone()].starts_with("-----BEGIN"));
        assert!(file[entries[1].span.clone()].starts_with("# mine\n# too\n-----BEGIN"));
        assert!(file[entries[1].span.clone()].ends_with("-----END CERTIFICATE-----\n"));
    }

    #[test]
    fn rejects_keys_truncation_and_junk() {
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert!(parse_bundle(key.as_bytes())
            .unwrap_err()
            .contains("private key"));
        let (a, _) = self_signed("a");
        let truncated = &a[..a.len() / 2];
        assert!(parse_bundle(truncated.as_bytes())
            .unwrap_err()
            .contains("not terminated"));
        let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(parse_bundle(junk.as_bytes())
            .unwrap_err()
            .contains("not a valid X.509"));
        assert!(parse_bundle(b"").unwrap().is_empty());
        let (_, der) = self_signed("a");
        assert!(parse_bundle(&der).unwrap_err().contains("not a PEM file"));
        assert!(parse_bundle(b"# nothing yet\n").unwrap().is_empty());
    }

    #[test]
    fn fingerprints() {
        let (_, der) = self_signed("a");
        let fp = fingerprint(&der);
        assert_eq!(fp.len(), 64);
        let colons: Vec<String> = fp
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8(c.to_vec()).unwrap().to_uppercase())
            .collect();
        let openssl = format!("SHA256 Fingerprint={}", colons.join(":"));
        assert_eq!(normalize_fingerprint(&openssl).as_deref(), Some(&*fp));
        assert_eq!(
            normalize_fingerprint(&format!("sha256:{fp}")).as_deref(),
            Some(&*fp)
        );
        assert_eq!(normalize_fingerprint("CN=client"), None);
    }

    #[test]
    fn control_characters_are_neutralised() {
        let (_, der) = self_signed("evil\n-----BEGIN CERTIFICATE-----");
        let info = CertInfo::from_der(&der).unwrap();
        assert!(!info.subject.contains('\n'), "{}", info.subject);
    }
}
