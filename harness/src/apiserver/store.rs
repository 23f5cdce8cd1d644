//! etcd as kube-apiserver uses it: raw keys and values ([`EtcdStore`], what `etcdctl get` shows,
//! optionally over TLS with client certificates like etcdctl's `--cacert/--cert/--key`), and the storage
//! layer that puts objects through the KMS v2 envelope on the way in and out ([`Storage`]). The
//! transformer itself lives in [`super::envelope`]; this file only moves bytes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn, TxnOp,
};
use zeroize::Zeroizing;

use super::{Envelope, Error};

/// Largest page one range read asks for; a prefix with more keys is read in several pages.
const PAGE: i64 = 500;
/// How long connecting and each request may take: a dead etcd must fail a command, not hang it.
const ETCD_TIMEOUT: Duration = Duration::from_secs(10);

/// Client certificates for an etcd that requires TLS (the apiserver's `--etcd-cafile`,
/// `--etcd-certfile`, `--etcd-keyfile`; etcdctl's `--cacert`, `--cert`, `--key`).
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    /// CA bundle that signed etcd's serving certificate.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    pub key: Option<PathBuf>,
}

/// Why etcd could not be used. Never carries values (they may be in clear).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Connecting or a request failed.
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// The client's error.
        source: etcd_client::Error,
    },
    /// A TLS file could not be read or is incomplete.
    #[error("etcd TLS: {0}")]
    Tls(String),
    /// No value under the key.
    #[error("no value at {0}")]
    NotFound(String),
    /// The envelope refused to write or read the value.
    #[error(transparent)]
    Envelope(#[from] Error),
    /// A storage that follows a node's apiserver was given a node that does not exist.
    #[error("no apiserver {0} in this control plane")]
    NoApiserver(usize),
}

impl StoreError {
    /// Whether etcd refused a read at a revision it has compacted away (the apiserver's 410 Expired).
    pub fn is_compacted(&self) -> bool {
        matches!(self, Self::Etcd { source, .. } if source.to_string().contains("compacted"))
    }
}

/// One value with the revision that last modified it (kube-apiserver's `resourceVersion`).
#[derive(Clone, Debug)]
pub struct Versioned {
    /// The etcd key.
    pub key: Vec<u8>,
    /// The raw value.
    pub value: Vec<u8>,
    /// etcd's `mod_revision` of the key.
    pub mod_revision: i64,
}

impl From<&etcd_client::KeyValue> for Versioned {
    fn from(kv: &etcd_client::KeyValue) -> Self {
        Self {
            key: kv.key().to_vec(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }
    }
}

/// One page of a range read at a fixed revision (a consistent snapshot across pages).
#[derive(Clone, Debug)]
pub struct Page {
    /// The values, in key order.
    pub items: Vec<Versioned>,
    /// The revision the page was read at (etcd's header revision for a read "now").
    pub revision: i64,
    /// How many keys in the range follow this page.
    pub remaining: i64,
}

/// Raw access to etcd: bytes in, bytes out, nothing decoded.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://127.0.0.1:2379`, or `https://…` with `tls`).
    pub async fn connect(endpoints: &[String], tls: &EtcdTls) -> Result<Self, StoreError> {
        let joined = endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(ETCD_TIMEOUT)
            .with_timeout(ETCD_TIMEOUT);
        if tls.ca.is_some() || tls.cert.is_some() || tls.key.is_some() {
            options = options.with_tls(tls_options(tls)?);
        }
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|source| StoreError::Etcd {
                endpoints: joined.clone(),
                source,
            })?;
        Ok(Self {
            client,
            endpoints: joined,
        })
    }

    fn failed(&self, source: etcd_client::Error) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    /// The value at `key`, if any.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut kv = self.client.kv_client();
        let response = kv.get(key, None).await.map_err(|e| self.failed(e))?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Writes `value` at `key`.
    pub async fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        kv.put(key, value, None).await.map_err(|e| self.failed(e))?;
        Ok(())
    }

    /// Deletes `key`; whether it existed.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, StoreError> {
        let mut kv = self.client.kv_client();
        let response = kv.delete(key, None).await.map_err(|e| self.failed(e))?;
        Ok(response.deleted() > 0)
    }

    /// The value at `key` with its `mod_revision`, if any.
    pub async fn get_versioned(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        let mut kv = self.client.kv_client();
        let response = kv.get(key, None).await.map_err(|e| self.failed(e))?;
        Ok(response.kvs().first().map(Versioned::from))
    }

    /// Writes `value` at `key` only if the key's `mod_revision` is `expected` (0: the key does not
    /// exist), as kube-apiserver's create and guaranteed update do. The new revision, or `None` when
    /// the key changed meanwhile.
    pub async fn put_if(&self, key: &[u8], value: Vec<u8>, expected: i64) -> Result<Option<i64>, StoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key, value, None)]);
        self.txn_revision(txn).await
    }

    /// Deletes `key` only if its `mod_revision` is `expected`. The revision of the delete, or `None`
    /// when the key changed (or vanished) meanwhile.
    pub async fn delete_if(&self, key: &[u8], expected: i64) -> Result<Option<i64>, StoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::delete(key, None)]);
        self.txn_revision(txn).await
    }

    async fn txn_revision(&self, txn: Txn) -> Result<Option<i64>, StoreError> {
        let mut kv = self.client.kv_client();
        let response = kv.txn(txn).await.map_err(|e| self.failed(e))?;
        Ok(response
            .succeeded()
            .then(|| response.header().map_or(0, |h| h.revision())))
    }

    /// At most `limit` values (0: all) from `start` up to the end of `prefix`, read at `revision`
    /// (0: now), with how many more follow. Reading an old revision after compaction fails
    /// ([`StoreError::is_compacted`]).
    pub async fn page(
        &self,
        prefix: &[u8],
        start: &[u8],
        limit: i64,
        revision: i64,
    ) -> Result<Page, StoreError> {
        let mut kv = self.client.kv_client();
        let options = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_limit(limit)
            .with_revision(revision);
        let response = kv.get(start, Some(options)).await.map_err(|e| self.failed(e))?;
        let items: Vec<Versioned> = response.kvs().iter().map(Versioned::from).collect();
        let returned = i64::try_from(items.len()).unwrap_or(i64::MAX);
        Ok(Page {
            revision: response.header().map_or(revision, |h| h.revision()),
            // `count` is every key in the range, `limit` notwithstanding.
            remaining: response.count().saturating_sub(returned).max(0),
            items,
        })
    }

    /// Every key and value under `prefix`, in key order, read in pages.
    pub async fn range(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        self.scan(prefix, |key, value| out.push((key.to_vec(), value.to_vec())))
            .await?;
        Ok(out)
    }

    /// Calls `visit` with every key and value under `prefix`, in key order, one page of at most
    /// 500 values in memory at a time (an audit of a large cluster must not hold all of etcd).
    /// Returns how many were visited.
    pub async fn scan(
        &self,
        prefix: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]),
    ) -> Result<usize, StoreError> {
        let end = prefix_end(prefix);
        let mut kv = self.client.kv_client();
        let mut visited = 0;
        // etcd has no empty key: the whole keyspace starts at "\0".
        let mut from = if prefix.is_empty() {
            vec![0]
        } else {
            prefix.to_vec()
        };
        loop {
            let options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            let response = kv
                .get(from.clone(), Some(options))
                .await
                .map_err(|e| self.failed(e))?;
            for pair in response.kvs() {
                visit(pair.key(), pair.value());
                visited += 1;
            }
            let Some(last) = response.kvs().last() else { break };
            if !response.more() {
                break;
            }
            // The next page starts just after the last key seen.
            from = last.key().to_vec();
            from.push(0);
        }
        Ok(visited)
    }
}

/// etcd's range end for "every key starting with `prefix`": the prefix with its last byte below 0xff
/// incremented and what follows dropped; `\0` (to the end of the keyspace) if there is none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, StoreError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| StoreError::Tls(format!("reading {}: {e}", path.display())))
    };
    let mut options = TlsOptions::new();
    if let Some(ca) = &tls.ca {
        options = options.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            // The key is read into a zeroizing buffer; the client copies it into its own config.
            let key = Zeroizing::new(read(key)?);
            options = options.identity(Identity::from_pem(read(cert)?, key.as_slice()));
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Tls(
                "a client certificate needs both --cert and --key".into(),
            ));
        }
    }
    Ok(options)
}

/// The envelopes of a control plane's apiservers, one slot per node; a cold restart replaces a
/// node's slot with a new envelope (empty cache, new seed).
pub type Apiservers = Arc<RwLock<Vec<Arc<Envelope>>>>;

/// kube-apiserver's storage path for one KMS v2 provider: objects go through the envelope into etcd
/// and back, the etcd key being the AAD.
#[derive(Clone, Debug)]
pub struct Storage {
    /// Raw etcd.
    pub etcd: EtcdStore,
    envelope: Source,
}

/// Which envelope a [`Storage`] uses.
#[derive(Clone, Debug)]
enum Source {
    /// One for good: the `apiserver` command, the demo, the tests.
    Fixed(Arc<Envelope>),
    /// Whatever node `.1`'s slot holds at each call: a scenario restarts apiservers cold under a
    /// Secrets API that keeps serving, and every request after the restart must use the new one.
    Slot(Apiservers, usize),
}

impl Storage {
    /// Storage over `etcd` with `envelope`.
    pub fn new(etcd: EtcdStore, envelope: Arc<Envelope>) -> Self {
        Self {
            etcd,
            envelope: Source::Fixed(envelope),
        }
    }

    /// Storage over `etcd` with whichever envelope node `index` of `apiservers` holds at each call.
    pub fn following(etcd: EtcdStore, apiservers: Apiservers, index: usize) -> Self {
        Self {
            etcd,
            envelope: Source::Slot(apiservers, index),
        }
    }

    /// The envelope this call uses.
    pub fn envelope(&self) -> Result<Arc<Envelope>, StoreError> {
        match &self.envelope {
            Source::Fixed(envelope) => Ok(envelope.clone()),
            Source::Slot(apiservers, index) => apiservers
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(*index)
                .cloned()
                .ok_or(StoreError::NoApiserver(*index)),
        }
    }

    /// Encrypts `plaintext` (a serialized object) for `key` and writes it; returns the stored bytes.
    pub async fn put(&self, key: &str, plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        let value = self.envelope()?.write(key, plaintext)?;
        self.etcd.put(key.as_bytes(), value.clone()).await?;
        Ok(value)
    }

    /// Encrypts `plaintext` for `key` and writes it only if the key's `mod_revision` is `expected`
    /// (0: create). The new revision, or `None` when the key changed meanwhile.
    pub async fn put_if(
        &self,
        key: &str,
        plaintext: &[u8],
        expected: i64,
    ) -> Result<Option<i64>, StoreError> {
        let value = self.envelope()?.write(key, plaintext)?;
        self.etcd.put_if(key.as_bytes(), value, expected).await
    }

    /// Reads and decrypts the value at `key`: the plaintext, and whether it is stale (written under
    /// another key ID or seed type than the current one).
    pub async fn get(&self, key: &str) -> Result<(Zeroizing<Vec<u8>>, bool), StoreError> {
        let value = self
            .etcd
            .get(key.as_bytes())
            .await?
            .ok_or_else(|| StoreError::NotFound(key.to_owned()))?;
        Ok(self.envelope()?.read(key, &value).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/registry/secrets/"), b"/registry/secrets0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
