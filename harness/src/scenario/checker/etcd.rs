//! (a) No plaintext in etcd: every value under the prefix is a well-formed KMS v2 value (the
//! [`audit`](crate::audit)), and no run of [`NoPlaintextInEtcd::WINDOW`] bytes of any plaintext the
//! workload wrote occurs in any stored value. The history holds only digests, so the workload hands the
//! plaintexts over.

use std::collections::BTreeMap;

use super::{Check, Checker, Needles};
use crate::audit::{Audit, Class};
use crate::scenario::history::Event;

/// Checks a raw etcd snapshot for values in clear and for runs of written plaintexts.
pub struct NoPlaintextInEtcd {
    /// Only keys under this prefix must be KMS v2 values (`/registry/secrets/`).
    pub prefix: Vec<u8>,
    /// Every `(key, value)` in etcd, as read raw after the run.
    pub snapshot: Vec<(Vec<u8>, Vec<u8>)>,
    /// Every plaintext the workload wrote (serialized objects or their data values).
    pub plaintexts: Vec<Vec<u8>>,
}

impl NoPlaintextInEtcd {
    /// Bytes per searched run: 12 random bytes match by chance with probability ~2^-96, and no
    /// protobuf or JSON framing of a Secret is shorter than that without its name in it.
    pub const WINDOW: usize = 12;
}

impl Checker for NoPlaintextInEtcd {
    fn name(&self) -> &'static str {
        "no_plaintext_in_etcd"
    }

    fn check(&self, _history: &[Event]) -> Check {
        let mut check = Check::new(self.name());
        let mut audit = Audit::new();
        for (key, value) in &self.snapshot {
            if !key.starts_with(&self.prefix) {
                continue;
            }
            let shown = String::from_utf8_lossy(key);
            match audit.add(key, value) {
                Class::KmsV2(v) => {
                    if let Some(problem) = v.problem {
                        check.violation(
                            format!("{shown}: KMS v2 value the apiserver refuses: {problem}"),
                            None,
                        );
                    }
                }
                other => check.violation(format!("{shown}: stored as {other}, not KMS v2"), None),
            }
        }
        check.figure("values", self.snapshot.len());
        check.figure("values_under_prefix", audit.total());
        check.figure("kms_v2", audit.count("kms-v2"));
        check.figure("in_clear", audit.in_clear().len());
        check.figure("kms_v2_key_ids", audit.kms_v2_key_ids().len());
        if audit.total() == 0 {
            check.unknown(format!(
                "no value under {} to check",
                String::from_utf8_lossy(&self.prefix)
            ));
        }
        self.search_runs(&mut check);
        check
    }
}

impl NoPlaintextInEtcd {
    /// Indexes every window of every plaintext, then walks each stored value once.
    fn search_runs(&self, check: &mut Check) {
        let mut needles = Needles::new(Self::WINDOW);
        // Window number → which plaintext it came from.
        let mut origin = Vec::new();
        let mut too_short = 0;
        for (number, plaintext) in self.plaintexts.iter().enumerate() {
            if plaintext.len() < Self::WINDOW {
                too_short += 1;
            }
            for window in plaintext.windows(Self::WINDOW) {
                if needles.add(window).is_some() {
                    origin.push(number);
                }
            }
        }
        check.figure("plaintexts", self.plaintexts.len());
        check.figure("plaintexts_too_short", too_short);
        check.figure("windows", origin.len());
        let mut leaks: BTreeMap<String, usize> = BTreeMap::new();
        for (key, value) in &self.snapshot {
            for id in needles.found_in(value) {
                let Some(&plaintext) = origin.get(id) else {
                    continue;
                };
                let key = String::from_utf8_lossy(key).into_owned();
                leaks.entry(key).or_insert(plaintext);
            }
        }
        check.figure("values_with_plaintext_runs", leaks.len());
        for (key, plaintext) in leaks {
            check.violation(
                format!(
                    "{key}: holds a {}-byte run of written plaintext #{plaintext}",
                    Self::WINDOW
                ),
                None,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::apiserver::encrypted_object::{self, EncryptedObject};
    use crate::scenario::checker::Verdict;

    fn kms_v2(encrypted_data: Vec<u8>) -> Vec<u8> {
        let object = EncryptedObject {
            encrypted_data,
            key_id: "pkcs11:kek:01".into(),
            encrypted_dek_source: vec![7; 64],
            annotations: BTreeMap::new(),
            encrypted_dek_source_type: 1,
        };
        [
            b"k8s:enc:kms:v2:kleidi:".as_slice(),
            &encrypted_object::marshal(&object),
        ]
        .concat()
    }

    fn checker(snapshot: Vec<(&str, Vec<u8>)>, plaintexts: &[&[u8]]) -> NoPlaintextInEtcd {
        NoPlaintextInEtcd {
            prefix: b"/registry/secrets/".to_vec(),
            snapshot: snapshot
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v))
                .collect(),
            plaintexts: plaintexts.iter().map(|p| p.to_vec()).collect(),
        }
    }

    const SECRET: &[u8] = b"k8s\0\x0a\x0csecret-value-hunter2-0123456789";

    #[test]
    fn encrypted_values_without_plaintext_runs_are_valid() {
        let c = checker(
            vec![
                ("/registry/secrets/default/a", kms_v2(vec![0x5a; 80])),
                // Outside the prefix, clear values are not this checker's business.
                ("/registry/configmaps/default/b", b"k8s\0\x0a\x01".to_vec()),
            ],
            &[SECRET],
        );
        let check = c.check(&[]);
        assert_eq!(check.verdict, Verdict::Valid, "{check:?}");
        assert_eq!(check.figures["kms_v2"], 1);
        assert_eq!(check.figures["windows"], SECRET.len() - 11);
    }

    #[test]
    fn a_value_in_clear_under_the_prefix_is_invalid() {
        let c = checker(
            vec![
                ("/registry/secrets/default/a", kms_v2(vec![0x5a; 80])),
                ("/registry/secrets/default/b", b"{\"kind\":\"Secret\"}".to_vec()),
            ],
            &[],
        );
        let check = c.check(&[]);
        assert_eq!(check.verdict, Verdict::Invalid);
        assert_eq!(check.figures["in_clear"], 1);
        assert!(
            check.violations[0]
                .what
                .starts_with("/registry/secrets/default/b: stored as plaintext-json"),
            "{check:?}"
        );
    }

    #[test]
    fn a_kms_v2_value_the_apiserver_would_refuse_is_invalid() {
        let mut bad = kms_v2(vec![0x5a; 80]);
        bad.truncate(bad.len() - 3);
        let check = checker(vec![("/registry/secrets/x/y", bad)], &[]).check(&[]);
        assert_eq!(check.verdict, Verdict::Invalid, "{check:?}");
    }

    #[test]
    fn twelve_bytes_of_a_written_plaintext_inside_an_encrypted_value_is_invalid() {
        let mut leaky = vec![0x5a; 40];
        leaky.extend(&SECRET[10..22]);
        leaky.extend([0x5a; 40]);
        let c = checker(
            vec![
                ("/registry/secrets/default/a", kms_v2(vec![0x5a; 80])),
                ("/registry/secrets/default/leaky", kms_v2(leaky)),
            ],
            &[b"another plaintext, long enough", SECRET],
        );
        let check = c.check(&[]);
        assert_eq!(check.verdict, Verdict::Invalid);
        assert_eq!(check.violations.len(), 1);
        assert_eq!(
            check.violations[0].what,
            "/registry/secrets/default/leaky: holds a 12-byte run of written plaintext #1"
        );
    }

    #[test]
    fn eleven_bytes_of_a_plaintext_are_not_a_leak() {
        let mut value = vec![0x5a; 40];
        value.extend(&SECRET[10..21]);
        let check = checker(vec![("/registry/secrets/d/a", kms_v2(value))], &[SECRET]).check(&[]);
        assert_eq!(check.verdict, Verdict::Valid, "{check:?}");
    }

    #[test]
    fn an_empty_prefix_is_unknown_not_valid() {
        let check = checker(vec![("/registry/configmaps/a", vec![1])], &[SECRET]).check(&[]);
        assert_eq!(check.verdict, Verdict::Unknown);
    }
}
