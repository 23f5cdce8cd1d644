//! A cold apiserver (empty cache) must make one Decrypt per distinct seed among the values it reads,
//! not one per object: upstream's read cache is keyed by the wrapped seed (spec 2.4). A cold start
//! that decrypted per object would storm the plugin at every apiserver restart.

use std::collections::BTreeSet;

use super::{Check, Checker};
use crate::apiserver::encrypted_object;
use crate::scenario::history::{self, Cache, Event, Method, Outcome};

/// Compares each node's Decrypt RPCs during its cold final reads with the distinct seeds in etcd.
pub struct ColdReadsDecryptOncePerSeed {
    /// `k8s:enc:kms:v2:<provider>:`.
    pub value_prefix: Vec<u8>,
    /// Raw etcd after the run: (key, value).
    pub snapshot: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Checker for ColdReadsDecryptOncePerSeed {
    fn name(&self) -> &'static str {
        "cold_reads_decrypt_once_per_seed"
    }

    fn check(&self, history: &[Event]) -> Check {
        let mut check = Check::new(self.name());
        let seeds: BTreeSet<Vec<u8>> = self
            .snapshot
            .iter()
            .filter_map(|(_, value)| value.strip_prefix(self.value_prefix.as_slice()))
            .filter_map(|body| encrypted_object::decode(body).ok())
            .map(|object| object.encrypted_dek_source)
            .collect();
        check.figure("distinct_seeds", seeds.len());
        let cold: Vec<_> = history::ops(history)
            .filter(|op| op.final_read && op.cache == Some(Cache::Cold))
            .collect();
        let nodes: BTreeSet<usize> = cold.iter().map(|op| op.node).collect();
        if nodes.is_empty() || seeds.is_empty() {
            check.unknown("no cold final reads, or no seeds in etcd");
            return check;
        }
        for node in nodes {
            let ops: Vec<_> = cold.iter().filter(|op| op.node == node).collect();
            if ops.iter().any(|op| op.outcome != Outcome::Ok) {
                check.unknown(format!(
                    "node {node}: some cold reads failed, so its Decrypts prove nothing"
                ));
                continue;
            }
            let from = ops.iter().map(|op| op.start_ms).min().unwrap_or_default();
            let to = ops.iter().map(|op| op.end_ms).max().unwrap_or_default();
            let decrypts = history::rpcs(history)
                .filter(|r| r.node == node && r.method == Method::Decrypt && (from..=to).contains(&r.at_ms))
                .count();
            check.figure(&format!("node_{node}_cold_reads"), ops.len());
            check.figure(&format!("node_{node}_decrypts"), decrypts);
            if decrypts != seeds.len() {
                check.violation(
                    format!(
                        "node {node} made {decrypts} Decrypt calls reading {} objects cold; etcd holds {} distinct seeds",
                        ops.len(),
                        seeds.len()
                    ),
                    None,
                );
            }
        }
        check
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::encrypted_object::{EncryptedDekSourceType, EncryptedObject};
    use crate::scenario::Verdict;
    use crate::scenario::history::{Op, OpRecord, RpcRecord};

    fn value(seed: u8) -> Vec<u8> {
        let object = EncryptedObject {
            encrypted_data: vec![1; 40],
            key_id: "k".into(),
            encrypted_dek_source: vec![seed; 48],
            annotations: Default::default(),
            encrypted_dek_source_type: EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed as i32,
        };
        [
            b"k8s:enc:kms:v2:p:".to_vec(),
            encrypted_object::encode(&object).unwrap(),
        ]
        .concat()
    }

    fn history(decrypts: usize) -> Vec<Event> {
        let mut events = Vec::new();
        for (i, key) in ["a", "b", "c", "d"].iter().enumerate() {
            events.push(Event::Op(OpRecord {
                node: 0,
                op: Op::Read,
                key: (*key).into(),
                digest: Some("x".into()),
                cache: Some(Cache::Cold),
                final_read: true,
                start_ms: 100 + i as u64 * 10,
                end_ms: 105 + i as u64 * 10,
                outcome: Outcome::Ok,
            }));
        }
        for i in 0..decrypts {
            events.push(Event::Rpc(RpcRecord {
                node: 0,
                method: Method::Decrypt,
                key_id: "k".into(),
                code: "OK".into(),
                at_ms: 101 + i as u64 * 10,
                latency_ms: 1,
            }));
        }
        events
    }

    fn checker() -> ColdReadsDecryptOncePerSeed {
        // Four objects under two seeds.
        let snapshot = [1, 1, 2, 2]
            .iter()
            .enumerate()
            .map(|(i, s)| (vec![i as u8], value(*s)))
            .collect();
        ColdReadsDecryptOncePerSeed {
            value_prefix: b"k8s:enc:kms:v2:p:".to_vec(),
            snapshot,
        }
    }

    #[test]
    fn one_decrypt_per_seed_is_valid() {
        assert_eq!(checker().check(&history(2)).verdict, Verdict::Valid);
    }

    #[test]
    fn one_decrypt_per_object_is_invalid() {
        let check = checker().check(&history(4));
        assert_eq!(check.verdict, Verdict::Invalid);
        assert!(
            check.violations[0].what.contains("2 distinct seeds"),
            "{:?}",
            check.violations
        );
    }
}
