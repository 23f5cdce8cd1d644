//! Reading raw etcd values the way an operator reads `etcdctl get`: is a value in clear, which apiserver
//! transformer encrypted it, and for KMS v2 what the stored metadata says (provider, key ID, type,
//! annotations, sizes). [`Audit`] sums that up over many keys; [`hexdump`] prints bytes like `hexdump -C`.
//! Nothing here decrypts.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use prost::Message;

use super::encrypted_object::{self, EncryptedObject, PREFIX_V2, Violation};
use super::object::PROTOBUF_MAGIC;

/// How a value that no transformer encrypted is serialized (the identity provider writes these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlainFormat {
    /// `k8s\0` protobuf.
    Protobuf,
    /// A JSON object.
    Json,
    /// Anything else without an encryption prefix.
    Other,
}

/// The stored `encryptedDEKSourceType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedType {
    /// 0: the DEK itself was wrapped (1.27, 1.28 without `KMSv2KDF`).
    AesGcmKey,
    /// 1: a seed was wrapped and each write derives its key (≥ 1.29).
    HkdfSha256XnonceAesGcmSeed,
    /// Any other number; the apiserver refuses to read it.
    Unknown(i32),
}

/// What a KMS v2 value says about itself, without decrypting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsV2Value {
    /// Provider name from the prefix.
    pub provider: String,
    /// Stored key ID.
    pub key_id: String,
    /// Stored DEK source type.
    pub seed_type: SeedType,
    /// Stored annotations (in clear by design).
    pub annotations: BTreeMap<String, Vec<u8>>,
    /// Length of `encryptedData`.
    pub encrypted_data_len: usize,
    /// Length of `encryptedDEKSource` (the wrapped seed or DEK).
    pub wrapped_len: usize,
    /// The apiserver rule the object breaks, if any (it would then fail to read).
    pub problem: Option<Violation>,
}

/// The class of one raw etcd value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Class {
    /// No encryption prefix: readable by anyone with etcd access.
    Plaintext(PlainFormat),
    /// `k8s:enc:aescbc:v1:<key>:`.
    AesCbc {
        /// Key name from the config.
        key_name: String,
    },
    /// `k8s:enc:aesgcm:v1:<key>:`.
    AesGcm {
        /// Key name from the config.
        key_name: String,
    },
    /// `k8s:enc:secretbox:v1:<key>:`.
    Secretbox {
        /// Key name from the config.
        key_name: String,
    },
    /// `k8s:enc:kms:v1:<provider>:`.
    KmsV1 {
        /// Provider name.
        provider: String,
    },
    /// `k8s:enc:kms:v2:<provider>:` with a decodable `EncryptedObject`.
    KmsV2(KmsV2Value),
    /// Starts with `k8s:enc:` but is not one of the above, or its KMS v2 body does not decode.
    Unknown {
        /// What is wrong.
        reason: String,
    },
}

impl Class {
    /// Whether the value is stored in clear.
    pub fn is_in_clear(&self) -> bool {
        matches!(self, Self::Plaintext(_))
    }

    /// A short stable label for counting: `plaintext-protobuf`, `kms-v2`, `unknown`, ….
    pub fn label(&self) -> &'static str {
        match self {
            Self::Plaintext(PlainFormat::Protobuf) => "plaintext-protobuf",
            Self::Plaintext(PlainFormat::Json) => "plaintext-json",
            Self::Plaintext(PlainFormat::Other) => "plaintext-other",
            Self::AesCbc { .. } => "aescbc",
            Self::AesGcm { .. } => "aesgcm",
            Self::Secretbox { .. } => "secretbox",
            Self::KmsV1 { .. } => "kms-v1",
            Self::KmsV2(_) => "kms-v2",
            Self::Unknown { .. } => "unknown",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plaintext(_) => write!(f, "{} (IN CLEAR)", self.label()),
            Self::AesCbc { key_name } | Self::AesGcm { key_name } | Self::Secretbox { key_name } => {
                write!(f, "{} key={key_name}", self.label())
            }
            Self::KmsV1 { provider } => write!(f, "kms-v1 provider={provider}"),
            Self::KmsV2(v) => {
                let seed_type = match v.seed_type {
                    SeedType::AesGcmKey => "AES_GCM_KEY".to_owned(),
                    SeedType::HkdfSha256XnonceAesGcmSeed => "HKDF_SHA256_XNONCE_AES_GCM_SEED".to_owned(),
                    SeedType::Unknown(n) => format!("unknown({n})"),
                };
                write!(
                    f,
                    "kms-v2 provider={} key_id={} type={seed_type} encrypted_data={}B wrapped_dek_source={}B",
                    v.provider, v.key_id, v.encrypted_data_len, v.wrapped_len
                )?;
                for (key, value) in &v.annotations {
                    write!(f, " annotation {key}={}", String::from_utf8_lossy(value))?;
                }
                match &v.problem {
                    Some(problem) => write!(f, " INVALID: {problem}"),
                    None => Ok(()),
                }
            }
            Self::Unknown { reason } => write!(f, "unknown: {reason}"),
        }
    }
}

/// Classifies one raw etcd value.
pub fn classify(value: &[u8]) -> Class {
    if let Some(rest) = value.strip_prefix(PREFIX_V2.as_bytes()) {
        return classify_kms_v2(rest);
    }
    let named = |rest: &[u8], what: &str, make: fn(String) -> Class| match split_name(rest) {
        Some((name, _)) => make(name),
        None => Class::Unknown {
            reason: format!("{what} prefix without a name and ':'"),
        },
    };
    if let Some(rest) = value.strip_prefix(b"k8s:enc:kms:v1:") {
        return named(rest, "kms v1", |provider| Class::KmsV1 { provider });
    }
    if let Some(rest) = value.strip_prefix(b"k8s:enc:aescbc:v1:") {
        return named(rest, "aescbc", |key_name| Class::AesCbc { key_name });
    }
    if let Some(rest) = value.strip_prefix(b"k8s:enc:aesgcm:v1:") {
        return named(rest, "aesgcm", |key_name| Class::AesGcm { key_name });
    }
    if let Some(rest) = value.strip_prefix(b"k8s:enc:secretbox:v1:") {
        return named(rest, "secretbox", |key_name| Class::Secretbox { key_name });
    }
    if value.starts_with(b"k8s:enc:") {
        return Class::Unknown {
            reason: "k8s:enc: prefix of an unknown transformer".into(),
        };
    }
    if value.starts_with(PROTOBUF_MAGIC) {
        return Class::Plaintext(PlainFormat::Protobuf);
    }
    match serde_json::from_slice::<serde_json::Value>(value) {
        Ok(serde_json::Value::Object(_)) => Class::Plaintext(PlainFormat::Json),
        _ => Class::Plaintext(PlainFormat::Other),
    }
}

/// The name before the next `:` (provider and key names cannot contain one), and what follows that
/// `:`. The rest is cut by byte position, not by the name's text, which is longer where a byte is
/// not UTF-8 (U+FFFD takes three).
fn split_name(rest: &[u8]) -> Option<(String, &[u8])> {
    let end = rest.iter().position(|b| *b == b':')?;
    let name = rest.get(..end).filter(|n| !n.is_empty())?;
    let after = rest.get(end + 1..).unwrap_or_default();
    Some((String::from_utf8_lossy(name).into_owned(), after))
}

fn classify_kms_v2(rest: &[u8]) -> Class {
    let Some((provider, body)) = split_name(rest) else {
        return Class::Unknown {
            reason: "kms v2 prefix without a provider name and ':'".into(),
        };
    };
    let object = match EncryptedObject::decode(body) {
        Ok(object) => object,
        Err(e) => {
            return Class::Unknown {
                reason: format!("kms v2 provider {provider}: {e}"),
            };
        }
    };
    let seed_type = match object.encrypted_dek_source_type {
        0 => SeedType::AesGcmKey,
        1 => SeedType::HkdfSha256XnonceAesGcmSeed,
        n => SeedType::Unknown(n),
    };
    Class::KmsV2(KmsV2Value {
        provider,
        problem: encrypted_object::validate(&object).err(),
        key_id: object.key_id,
        seed_type,
        encrypted_data_len: object.encrypted_data.len(),
        wrapped_len: object.encrypted_dek_source.len(),
        annotations: object.annotations,
    })
}

/// Counts over many `(key, value)` pairs: per class, per KMS v2 key ID, and the keys stored in clear.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    total: usize,
    counts: BTreeMap<&'static str, usize>,
    kms_v2_key_ids: BTreeMap<String, usize>,
    in_clear: Vec<String>,
}

impl Audit {
    /// Nothing counted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Classifies and counts one value; returns its class.
    pub fn add(&mut self, key: &[u8], value: &[u8]) -> Class {
        let class = classify(value);
        self.total += 1;
        *self.counts.entry(class.label()).or_default() += 1;
        if let Class::KmsV2(v) = &class {
            *self.kms_v2_key_ids.entry(v.key_id.clone()).or_default() += 1;
        }
        if class.is_in_clear() {
            self.in_clear.push(String::from_utf8_lossy(key).into_owned());
        }
        class
    }

    /// Values counted.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Values per class label.
    pub fn counts(&self) -> &BTreeMap<&'static str, usize> {
        &self.counts
    }

    /// Values with one class label (see [`Class::label`]).
    pub fn count(&self, label: &str) -> usize {
        self.counts.get(label).copied().unwrap_or(0)
    }

    /// KMS v2 values per stored key ID (after a rotation and migration, one key ID should remain).
    pub fn kms_v2_key_ids(&self) -> &BTreeMap<String, usize> {
        &self.kms_v2_key_ids
    }

    /// Keys whose values are in clear, in the order added.
    pub fn in_clear(&self) -> &[String] {
        &self.in_clear
    }

    /// Whether no value is in clear.
    pub fn all_encrypted(&self) -> bool {
        self.in_clear.is_empty()
    }
}

impl<K: AsRef<[u8]>, V: AsRef<[u8]>> FromIterator<(K, V)> for Audit {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        let mut audit = Self::new();
        for (key, value) in pairs {
            audit.add(key.as_ref(), value.as_ref());
        }
        audit
    }
}

impl fmt::Display for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts: Vec<String> = self
            .counts
            .iter()
            .map(|(label, n)| format!("{label} {n}"))
            .collect();
        writeln!(f, "{} values: {}", self.total, counts.join(", "))?;
        for (key_id, n) in &self.kms_v2_key_ids {
            writeln!(f, "  kms-v2 key_id {key_id}: {n}")?;
        }
        writeln!(f, "in clear: {}", self.in_clear.len())?;
        for key in &self.in_clear {
            writeln!(f, "  {key}")?;
        }
        Ok(())
    }
}

/// What `etcdctl get KEY | hexdump -C` prints: the key, a newline, the value, a newline.
pub fn etcdctl_hexdump(key: &[u8], value: &[u8]) -> String {
    hexdump(&[key, b"\n", value, b"\n"].concat())
}

/// `hexdump -C`: offset, 16 bytes in two groups of 8, `|ascii|`, repeated lines squeezed to `*`, and the
/// final offset on its own line (nothing at all for empty input).
pub fn hexdump(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(16) * 78 + 9);
    let mut previous: Option<&[u8]> = None;
    let mut squeezed = false;
    for (index, line) in bytes.chunks(16).enumerate() {
        if line.len() == 16 && previous == Some(line) {
            if !squeezed {
                out.push_str("*\n");
                squeezed = true;
            }
            continue;
        }
        squeezed = false;
        previous = Some(line);
        let hex = hex::encode(line);
        let _ = write!(out, "{:08x}  ", index * 16);
        for column in 0..16 {
            match hex.get(column * 2..column * 2 + 2) {
                Some(pair) => {
                    out.push_str(pair);
                    out.push(' ');
                }
                None => out.push_str("   "),
            }
            if column == 7 {
                out.push(' ');
            }
        }
        let ascii: String = line
            .iter()
            .map(|b| {
                if (0x20..0x7f).contains(b) {
                    char::from(*b)
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(out, " |{ascii}|");
    }
    if !bytes.is_empty() {
        let _ = writeln!(out, "{:08x}", bytes.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[rstest]
    #[case(b"k8s\0\x0a\x0c", "plaintext-protobuf")]
    #[case(b"{\"kind\":\"Secret\"}", "plaintext-json")]
    #[case(b"  {\"a\":1}\n", "plaintext-json")]
    #[case(b"hello", "plaintext-other")]
    #[case(b"", "plaintext-other")]
    #[case(b"k8s:enc:aescbc:v1:key1:\x01\x02", "aescbc")]
    #[case(b"k8s:enc:aesgcm:v1:key1:\x01\x02", "aesgcm")]
    #[case(b"k8s:enc:secretbox:v1:key1:\x01", "secretbox")]
    #[case(b"k8s:enc:kms:v1:prov:\x00\x20", "kms-v1")]
    #[case(b"k8s:enc:kms:v2:prov:\xff\xff\xff", "unknown")]
    #[case(b"k8s:enc:kms:v2:noname", "unknown")]
    #[case(b"k8s:enc:rot13:v1:x:", "unknown")]
    fn values_are_classified_by_prefix(#[case] value: &[u8], #[case] label: &str) {
        assert_eq!(classify(value).label(), label);
    }

    /// Found by fuzz/etcd_value: the object was read from the lossy name's length on, so a
    /// provider byte that is not UTF-8 shifted it and the value was reported as undecodable.
    #[test]
    fn a_provider_name_that_is_not_utf8_does_not_shift_the_object() {
        let object = EncryptedObject {
            encrypted_data: vec![1],
            key_id: "k".into(),
            encrypted_dek_source: vec![2],
            ..Default::default()
        };
        let mut value = b"k8s:enc:kms:v2:\xff:".to_vec();
        value.extend(encrypted_object::marshal(&object));
        let Class::KmsV2(v) = classify(&value) else {
            panic!("{:?}", classify(&value));
        };
        assert_eq!((v.provider.as_str(), v.key_id.as_str()), ("\u{fffd}", "k"));
    }

    #[test]
    fn named_prefixes_keep_their_names() {
        assert_eq!(
            classify(b"k8s:enc:aescbc:v1:key1:xx"),
            Class::AesCbc {
                key_name: "key1".into()
            }
        );
        assert_eq!(
            classify(b"k8s:enc:kms:v1:legacy:xx"),
            Class::KmsV1 {
                provider: "legacy".into()
            }
        );
    }

    #[test]
    fn kms_v2_metadata_is_read_and_rule_breaks_reported() {
        let object = EncryptedObject {
            encrypted_data: vec![0; 70],
            key_id: String::new(),
            encrypted_dek_source: vec![1; 64],
            annotations: BTreeMap::new(),
            encrypted_dek_source_type: 1,
        };
        let value = [
            b"k8s:enc:kms:v2:p:".as_slice(),
            &encrypted_object::marshal(&object),
        ]
        .concat();
        let Class::KmsV2(v) = classify(&value) else {
            panic!("not kms v2")
        };
        assert_eq!(
            (v.provider.as_str(), v.encrypted_data_len, v.wrapped_len),
            ("p", 70, 64)
        );
        assert_eq!(v.seed_type, SeedType::HkdfSha256XnonceAesGcmSeed);
        assert_eq!(v.problem, Some(Violation::EmptyKeyId));
    }

    #[test]
    fn audit_counts_classes_key_ids_and_keys_in_clear() {
        let object = EncryptedObject {
            encrypted_data: vec![0; 70],
            key_id: "k1".into(),
            encrypted_dek_source: vec![1; 64],
            annotations: BTreeMap::new(),
            encrypted_dek_source_type: 1,
        };
        let v2 = [
            b"k8s:enc:kms:v2:p:".as_slice(),
            &encrypted_object::marshal(&object),
        ]
        .concat();
        let audit: Audit = [
            (b"/registry/secrets/a/x".as_slice(), v2.as_slice()),
            (b"/registry/secrets/a/y", v2.as_slice()),
            (b"/registry/secrets/a/z", b"k8s\0\x0a"),
        ]
        .into_iter()
        .collect();
        assert_eq!(audit.total(), 3);
        assert_eq!((audit.count("kms-v2"), audit.count("plaintext-protobuf")), (2, 1));
        assert_eq!(audit.kms_v2_key_ids().get("k1"), Some(&2));
        assert_eq!(audit.in_clear(), ["/registry/secrets/a/z"]);
        assert!(!audit.all_encrypted());
        assert!(audit.to_string().contains("in clear: 1\n  /registry/secrets/a/z"));
    }

    // Outputs of util-linux `hexdump -C` for the same inputs.
    #[rstest]
    #[case(b"", "")]
    #[case(
        b"hello\n",
        "00000000  68 65 6c 6c 6f 0a                                 |hello.|\n00000006\n"
    )]
    #[case(
        b"01234567",
        "00000000  30 31 32 33 34 35 36 37                           |01234567|\n00000008\n"
    )]
    #[case(
        b"0123456789abcdef0123456789abcdef0123456789abcdefxyz",
        "00000000  30 31 32 33 34 35 36 37  38 39 61 62 63 64 65 66  |0123456789abcdef|\n*\n\
         00000030  78 79 7a                                          |xyz|\n00000033\n"
    )]
    #[case(
        &[0u8; 40],
        "00000000  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |................|\n*\n\
         00000020  00 00 00 00 00 00 00 00                           |........|\n00000028\n"
    )]
    fn hexdump_matches_hexdump_c(#[case] bytes: &[u8], #[case] expected: &str) {
        assert_eq!(hexdump(bytes), expected);
    }

    #[test]
    fn hexdump_matches_the_system_tool_when_present() {
        let Ok(mut child) = std::process::Command::new("hexdump")
            .arg("-C")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            return; // no hexdump binary: the fixed cases above still run
        };
        let mut bytes: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        bytes.extend([7u8; 64]);
        bytes.extend(b"tail\x00\x7f\x80");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), &bytes).unwrap();
        drop(child.stdin.take());
        let output = child.wait_with_output().unwrap();
        assert_eq!(hexdump(&bytes), String::from_utf8(output.stdout).unwrap());
    }
}
