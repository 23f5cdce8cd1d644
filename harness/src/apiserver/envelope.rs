//! kube-apiserver's KMS v2 envelope (≥ 1.29), byte for byte (spec 2.3, 2.4, 4). One write state holds a
//! 32-byte seed wrapped once by the plugin; every write derives its own AES-256 key from it
//! (HKDF-Expand with 32 random `info` bytes) and stores `k8s:enc:kms:v2:<provider>:` ‖ `EncryptedObject`.
//! Reads look the wrapped seed up in a cache and call Decrypt only on a miss, with the stored key ID and
//! annotations. [`Envelope::refresh`] is the apiserver's probe: Status, then a new seed only when the
//! key ID changed. Not here: the stored format itself ([`super::encrypted_object`]), the ciphers
//! ([`super::aes`]) and the plugin connection ([`super::kms`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::aes::{Gcm, INFO_LEN, NONCE_LEN, SEED_LEN, SeedGcm};
use super::encrypted_object::{self, EncryptedDekSourceType, EncryptedObject, PREFIX_V2, key_id_hash};
use super::inputs::{Clock, Draw, OsRandom, Randomness, SystemClock};
use super::kms::{DecryptRequest, KmsClient};
use super::{Error, audit};

/// `kmsv2PluginWriteDEKSourceMaxTTL`: writes are refused this long after the last good probe.
pub const WRITE_STATE_TTL: Duration = Duration::from_secs(3 * 60);
/// `kmsv2PluginHealthzPositiveInterval`: probe period while healthy.
pub const HEALTHY_PROBE_INTERVAL: Duration = Duration::from_secs(60);
/// `kmsv2PluginHealthzNegativeInterval`: probe period after a failure.
pub const UNHEALTHY_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// `cacheTTL`: read-cache entries older than this are dropped when another is stored (and still
/// returned until then, like upstream's `AllowExpiredGet`).
pub const CACHE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// What one successful probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Status's key ID, now the write state's.
    pub key_id: String,
    /// Whether a new seed was generated and wrapped (the key ID changed, or there was no state).
    pub rotated: bool,
}

/// Counters for checks such as "one Decrypt per seed after a restart".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Encrypt RPCs sent (one per rotation attempt).
    pub encrypt_calls: u64,
    /// Decrypt RPCs sent (one per read-cache miss).
    pub decrypt_calls: u64,
    /// Reads served from the cache.
    pub cache_hits: u64,
    /// Read transformers cached now.
    pub cache_entries: usize,
}

/// Decrypts `encryptedData` for one cache entry.
enum ReadTransformer {
    Seed(Arc<SeedGcm>),
    Key(Gcm),
}

impl ReadTransformer {
    /// Built from Decrypt's plaintext: at least 32 bytes in seed mode, 16/24/32 in `AES_GCM_KEY` mode.
    fn new(kind: EncryptedDekSourceType, plaintext: &[u8]) -> Result<Self, Error> {
        Ok(match kind {
            EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed => {
                Self::Seed(Arc::new(SeedGcm::new(plaintext)?))
            }
            EncryptedDekSourceType::AesGcmKey => Self::Key(Gcm::new(plaintext)?),
        })
    }

    fn open(&self, data: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        match self {
            Self::Seed(seed) => seed.open(data, aad),
            Self::Key(key) => key.open(data, aad),
        }
    }
}

/// The state writes use; replaced whole on rotation, only its expiration moves otherwise.
#[derive(Clone)]
struct WriteState {
    seed: Arc<SeedGcm>,
    read: Arc<ReadTransformer>,
    /// `encryptedData` empty; everything else as stored with each write.
    object: EncryptedObject,
    expiration: Instant,
    cache_key: [u8; 32],
}

struct CacheEntry {
    transformer: Arc<ReadTransformer>,
    stored: Instant,
}

/// One KMS v2 provider as kube-apiserver runs it.
pub struct Envelope {
    provider: String,
    prefix: Vec<u8>,
    kms: Arc<dyn KmsClient>,
    random: Mutex<Box<dyn Randomness>>,
    clock: Arc<dyn Clock>,
    state: RwLock<Option<WriteState>>,
    cache: Mutex<HashMap<[u8; 32], CacheEntry>>,
    /// Serialises probes and remembers the first accepted Status version.
    probe: tokio::sync::Mutex<Option<String>>,
    healthy: AtomicBool,
    encrypt_calls: AtomicU64,
    decrypt_calls: AtomicU64,
    cache_hits: AtomicU64,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("provider", &self.provider)
            .field("key_id", &self.key_id())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Envelope {
    /// A provider named `provider` (no `:`) backed by `kms`, with OS randomness and the system clock.
    /// It has no write state until the first successful [`refresh`](Self::refresh).
    pub fn new(provider: impl Into<String>, kms: Arc<dyn KmsClient>) -> Result<Self, Error> {
        let provider = provider.into();
        if provider.is_empty() || provider.contains(':') {
            return Err(Error::ProviderName(provider));
        }
        Ok(Self {
            prefix: format!("{PREFIX_V2}{provider}:").into_bytes(),
            provider,
            kms,
            random: Mutex::new(Box::new(OsRandom)),
            clock: Arc::new(SystemClock),
            state: RwLock::new(None),
            cache: Mutex::new(HashMap::new()),
            probe: tokio::sync::Mutex::new(None),
            healthy: AtomicBool::new(false),
            encrypt_calls: AtomicU64::new(0),
            decrypt_calls: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
        })
    }

    /// Replaces the randomness (seeds, infos, nonces, uids), e.g. with recorded bytes.
    pub fn with_randomness(mut self, random: impl Randomness + 'static) -> Self {
        self.random = Mutex::new(Box::new(random));
        self
    }

    /// Replaces the clock that write-state expiry is measured on.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The provider name.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// `k8s:enc:kms:v2:<provider>:`, the start of every value this provider writes.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The write state's key ID, if there is a state.
    pub fn key_id(&self) -> Option<String> {
        self.read_state().as_ref().map(|s| s.object.key_id.clone())
    }

    /// Whether the last probe succeeded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Call and cache counters.
    pub fn stats(&self) -> Stats {
        Stats {
            encrypt_calls: self.encrypt_calls.load(Ordering::SeqCst),
            decrypt_calls: self.decrypt_calls.load(Ordering::SeqCst),
            cache_hits: self.cache_hits.load(Ordering::SeqCst),
            cache_entries: self.lock_cache().len(),
        }
    }

    /// Encrypts `plaintext` (the serialized object) for etcd key `key`, which is also the AAD. Needs a
    /// write state checked within the last 3 minutes; makes no RPC.
    pub fn write(&self, key: impl AsRef<[u8]>, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let key = key.as_ref();
        let state = self.read_state().clone().ok_or(Error::NoState)?;
        let now = self.clock.now();
        if now > state.expiration {
            return Err(Error::Expired {
                key_id_hash: key_id_hash(&state.object.key_id),
                ago: now.duration_since(state.expiration),
            });
        }
        // Upstream re-inserts the write transformer on every write so its own data never misses.
        self.cache_insert(state.cache_key, state.read.clone());
        let mut info = [0u8; INFO_LEN];
        let mut nonce = [0u8; NONCE_LEN];
        {
            let mut random = self.random.lock().unwrap_or_else(PoisonError::into_inner);
            random.fill(Draw::Info, &mut info);
            random.fill(Draw::Nonce, &mut nonce);
        }
        let mut object = state.object;
        object.encrypted_data = state.seed.seal(&info, &nonce, plaintext, key)?;
        let mut value = self.prefix.clone();
        value.extend_from_slice(&encrypted_object::encode(&object)?);
        Ok(value)
    }

    /// Decrypts a value read from etcd key `key`. Returns the plaintext and whether it is stale (stored
    /// key ID or type differs from the write state's: the apiserver would rewrite it on next update).
    pub async fn read(
        &self,
        key: impl AsRef<[u8]>,
        value: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, bool), Error> {
        let key = key.as_ref();
        let body = value
            .strip_prefix(self.prefix.as_slice())
            .ok_or_else(|| Error::WrongPrefix {
                expected: String::from_utf8_lossy(&self.prefix).into_owned(),
                found: audit::classify(value).label(),
            })?;
        let object = encrypted_object::decode(body)?;
        let (state_key_id, state_type) = {
            let state = self.read_state();
            let state = state.as_ref().ok_or(Error::NoState)?;
            (
                state.object.key_id.clone(),
                state.object.encrypted_dek_source_type,
            )
        };
        let cache_key: [u8; 32] = Sha256::digest(encrypted_object::cache_key(&object)?).into();
        let cached = self
            .lock_cache()
            .get(&cache_key)
            .map(|entry| entry.transformer.clone());
        let transformer = match cached {
            Some(transformer) => {
                self.cache_hits.fetch_add(1, Ordering::SeqCst);
                transformer
            }
            None => {
                let request = DecryptRequest {
                    ciphertext: object.encrypted_dek_source.clone(),
                    key_id: object.key_id.clone(),
                    annotations: object.annotations.clone(),
                };
                let uid = self.new_uid();
                self.decrypt_calls.fetch_add(1, Ordering::SeqCst);
                let plaintext = self
                    .kms
                    .decrypt(&uid, &request)
                    .await
                    .map_err(|s| Error::rpc("Decrypt", &s))?;
                // `decode` validated the type, so the fallback is unreachable.
                let kind = EncryptedDekSourceType::try_from(object.encrypted_dek_source_type)
                    .unwrap_or(EncryptedDekSourceType::AesGcmKey);
                let transformer = Arc::new(ReadTransformer::new(kind, &plaintext)?);
                self.cache_insert(cache_key, transformer.clone());
                transformer
            }
        };
        let plaintext = transformer.open(&object.encrypted_data, key)?;
        let stale = object.key_id != state_key_id || object.encrypted_dek_source_type != state_type;
        Ok((plaintext, stale))
    }

    /// The apiserver's probe (`kmsv2PluginProbe.check` without its result cache): Status; healthz must be
    /// `"ok"` and the version `"v2"`/`"v2beta1"` and unchanged; a valid key ID runs the rotation step even
    /// when healthz is bad. Rotation: same key ID → only the 3-minute expiry moves; otherwise a new seed
    /// is wrapped with Encrypt, validated, and installed only if Encrypt's key ID equals Status's — on
    /// any failure the old state and its old expiry stay.
    pub async fn refresh(&self) -> Result<Probe, Error> {
        let mut first_version = self.probe.lock().await;
        let result = self.probe_once(&mut first_version).await;
        self.healthy.store(result.is_ok(), Ordering::SeqCst);
        result
    }

    async fn probe_once(&self, first_version: &mut Option<String>) -> Result<Probe, Error> {
        let status = self.kms.status().await.map_err(|s| Error::rpc("Status", &s))?;
        let mut problems = Vec::new();
        if status.healthz != "ok" {
            problems.push(Error::Healthz(status.healthz.clone()));
        }
        if status.version != "v2" && status.version != "v2beta1" {
            problems.push(Error::Version(status.version.clone()));
        } else {
            let first = first_version.get_or_insert_with(|| status.version.clone());
            if *first != status.version {
                problems.push(Error::VersionChanged {
                    first: first.clone(),
                    got: status.version.clone(),
                });
            }
        }
        let mut rotated = false;
        match encrypted_object::validate_key_id(&status.key_id) {
            Err(violation) => problems.push(violation.into()),
            Ok(()) => match self.rotate_on_key_id_change(&status.key_id).await {
                Ok(r) => rotated = r,
                Err(e) => problems.push(e),
            },
        }
        if problems.is_empty() {
            Ok(Probe {
                key_id: status.key_id,
                rotated,
            })
        } else {
            Err(Error::Unhealthy {
                provider: self.provider.clone(),
                problems,
            })
        }
    }

    /// `rotateDEKOnKeyIDChange`. Returns whether a new state was installed.
    async fn rotate_on_key_id_change(&self, status_key_id: &str) -> Result<bool, Error> {
        // Measured before any RPC: the TTL is an upper bound.
        let expiration = self.clock.now() + WRITE_STATE_TTL;
        {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(state) = state.as_mut().filter(|s| s.object.key_id == status_key_id) {
                state.expiration = expiration;
                return Ok(false);
            }
        }
        let mut seed = Zeroizing::new([0u8; SEED_LEN]);
        self.random
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fill(Draw::Seed, seed.as_mut_slice());
        let uid = self.new_uid();
        self.encrypt_calls.fetch_add(1, Ordering::SeqCst);
        let response = self
            .kms
            .encrypt(&uid, seed.as_slice())
            .await
            .map_err(|s| Error::rpc("Encrypt", &s))?;
        let mut object = EncryptedObject {
            encrypted_data: vec![0], // any non-empty value passes validation, as upstream
            key_id: response.key_id,
            encrypted_dek_source: response.ciphertext,
            annotations: response.annotations,
            encrypted_dek_source_type: EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed as i32,
        };
        encrypted_object::validate(&object)?;
        if object.key_id != status_key_id {
            return Err(Error::KeyIdMismatch {
                status_hash: key_id_hash(status_key_id),
                encrypt_hash: key_id_hash(&object.key_id),
            });
        }
        object.encrypted_data = Vec::new();
        let cache_key = Sha256::digest(encrypted_object::cache_key(&object)?).into();
        let seed = Arc::new(SeedGcm::new(seed.as_slice())?);
        let read = Arc::new(ReadTransformer::Seed(seed.clone()));
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = Some(WriteState {
            seed,
            read,
            object,
            expiration,
            cache_key,
        });
        Ok(true)
    }

    /// Probes forever like the apiserver's background loop: every minute after a good probe, every 10 s
    /// after a failed one (or before the first success). Call [`refresh`](Self::refresh) once at startup
    /// first, as the apiserver does inline; spawn this or `select!` it against a shutdown signal.
    pub async fn run_probes(&self) {
        loop {
            let interval = if self.healthy() {
                HEALTHY_PROBE_INTERVAL
            } else {
                UNHEALTHY_PROBE_INTERVAL
            };
            tokio::time::sleep(interval).await;
            // The outcome is kept in `healthy()` and in the write state; errors need no other home.
            let _ = self.refresh().await;
        }
    }

    fn new_uid(&self) -> String {
        let mut bytes = [0u8; 16];
        self.random
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fill(Draw::Uid, &mut bytes);
        uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, Option<WriteState>> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], CacheEntry>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `simpleCache.set`: store, and drop entries older than the TTL (upstream GCs only on set).
    fn cache_insert(&self, key: [u8; 32], transformer: Arc<ReadTransformer>) {
        let now = self.clock.now();
        let mut cache = self.lock_cache();
        cache.retain(|_, entry| now.saturating_duration_since(entry.stored) <= CACHE_TTL);
        cache.insert(
            key,
            CacheEntry {
                transformer,
                stored: now,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    // What holds a seed or a derived key has no Debug or Display (Envelope's own Debug prints the
    // provider, key_id and counters only), so no log line or panic message can print one.
    static_assertions::assert_not_impl_any!(super::WriteState: std::fmt::Debug, std::fmt::Display);
    static_assertions::assert_not_impl_any!(super::CacheEntry: std::fmt::Debug, std::fmt::Display);
    static_assertions::assert_not_impl_any!(
        super::ReadTransformer: std::fmt::Debug,
        std::fmt::Display
    );
    static_assertions::assert_not_impl_any!(
        crate::apiserver::aes::SeedGcm: std::fmt::Debug,
        std::fmt::Display
    );
    static_assertions::assert_not_impl_any!(
        crate::apiserver::aes::Gcm: std::fmt::Debug,
        std::fmt::Display
    );

    use std::collections::BTreeMap;

    use async_trait::async_trait;
    use base64::Engine as _;
    use prost::Message as _;
    use zeroize::Zeroizing;

    use super::*;
    use crate::apiserver::encrypted_object::Violation;
    use crate::apiserver::inputs::{ManualClock, Recorded};
    use crate::apiserver::kms::{Base64Kek, EncryptResponse, StatusResponse};

    const KEY: &str = "/registry/secrets/default/db";
    const SECRET: &[u8] = b"k8s\0 pretend this is a protobuf Secret: hunter2";

    /// The Base64 KEK with knobs for what a misbehaving plugin could answer, recording Decrypt requests.
    #[derive(Default)]
    struct Tweaked {
        kek: Base64Kek,
        status_version: Mutex<Option<String>>,
        status_healthz: Mutex<Option<String>>,
        encrypt_key_id: Mutex<Option<String>>,
        encrypt_annotations: Mutex<Option<BTreeMap<String, Vec<u8>>>>,
        decrypt_answer: Mutex<Option<Vec<u8>>>,
        decrypts: Mutex<Vec<(String, DecryptRequest)>>,
    }

    fn set<T>(slot: &Mutex<Option<T>>, value: T) {
        *slot.lock().unwrap() = Some(value);
    }

    #[async_trait]
    impl KmsClient for Tweaked {
        async fn status(&self) -> Result<StatusResponse, tonic::Status> {
            let mut status = self.kek.status().await?;
            if let Some(v) = self.status_version.lock().unwrap().clone() {
                status.version = v;
            }
            if let Some(h) = self.status_healthz.lock().unwrap().clone() {
                status.healthz = h;
            }
            Ok(status)
        }

        async fn encrypt(&self, uid: &str, plaintext: &[u8]) -> Result<EncryptResponse, tonic::Status> {
            let mut response = self.kek.encrypt(uid, plaintext).await?;
            if let Some(k) = self.encrypt_key_id.lock().unwrap().clone() {
                response.key_id = k;
            }
            if let Some(a) = self.encrypt_annotations.lock().unwrap().clone() {
                response.annotations = a;
            }
            Ok(response)
        }

        async fn decrypt(
            &self,
            uid: &str,
            request: &DecryptRequest,
        ) -> Result<Zeroizing<Vec<u8>>, tonic::Status> {
            self.decrypts
                .lock()
                .unwrap()
                .push((uid.to_owned(), request.clone()));
            let answer = self.decrypt_answer.lock().unwrap().clone();
            match answer {
                Some(answer) => Ok(Zeroizing::new(answer)),
                None => self.kek.decrypt(uid, request).await,
            }
        }
    }

    async fn started(kms: Arc<dyn KmsClient>) -> Envelope {
        let envelope = Envelope::new("kms-provider", kms).unwrap();
        envelope.refresh().await.unwrap();
        envelope
    }

    fn decode(envelope: &Envelope, value: &[u8]) -> EncryptedObject {
        EncryptedObject::decode(value.strip_prefix(envelope.prefix()).unwrap()).unwrap()
    }

    #[test]
    fn provider_names_with_a_colon_are_refused() {
        assert!(matches!(
            Envelope::new("a:b", Arc::new(Base64Kek::new())),
            Err(Error::ProviderName(_))
        ));
        assert!(matches!(
            Envelope::new("", Arc::new(Base64Kek::new())),
            Err(Error::ProviderName(_))
        ));
    }

    #[tokio::test]
    async fn write_then_read_round_trips_with_one_encrypt_and_no_decrypt() {
        let kek = Arc::new(Base64Kek::new());
        let envelope = started(kek.clone()).await;
        for _ in 0..3 {
            let value = envelope.write(KEY, SECRET).unwrap();
            let (plaintext, stale) = envelope.read(KEY, &value).await.unwrap();
            assert_eq!((plaintext.as_slice(), stale), (SECRET, false));
        }
        assert_eq!(
            (kek.encrypt_calls(), kek.decrypt_calls()),
            (1, 0),
            "seed reused, own writes cached"
        );
    }

    #[tokio::test]
    async fn written_value_has_the_upstream_layout() {
        let seed = [0x5a; 32];
        let random = Recorded::new()
            .push(Draw::Seed, seed)
            .push(Draw::Info, [1; 32])
            .push(Draw::Nonce, [2; 12]);
        let envelope = Envelope::new("kms-provider", Arc::new(Base64Kek::new()))
            .unwrap()
            .with_randomness(random);
        envelope.refresh().await.unwrap();
        let value = envelope.write(KEY, SECRET).unwrap();
        assert!(value.starts_with(b"k8s:enc:kms:v2:kms-provider:\x0a"));
        let object = decode(&envelope, &value);
        assert_eq!(object.key_id, "1");
        assert_eq!(
            object.encrypted_dek_source,
            base64::engine::general_purpose::STANDARD.encode(seed).as_bytes()
        );
        assert_eq!(
            object
                .annotations
                .get(Base64Kek::ANNOTATION_KEY)
                .map(Vec::as_slice),
            Some(Base64Kek::ANNOTATION_VALUE)
        );
        assert_eq!(object.encrypted_dek_source_type, 1);
        assert_eq!(object.encrypted_data.len(), 32 + 12 + SECRET.len() + 16);
        assert!(
            object
                .encrypted_data
                .starts_with(&[[1; 32].as_slice(), &[2; 12]].concat())
        );
        let expected = SeedGcm::new(&seed)
            .unwrap()
            .seal(&[1; 32], &[2; 12], SECRET, KEY.as_bytes())
            .unwrap();
        assert_eq!(object.encrypted_data, expected);
        assert!(value.ends_with(&[0x28, 0x01]), "type 1 is the last field");
    }

    #[tokio::test]
    async fn each_write_uses_fresh_info_and_nonce() {
        let envelope = started(Arc::new(Base64Kek::new())).await;
        let a = decode(&envelope, &envelope.write(KEY, SECRET).unwrap());
        let b = decode(&envelope, &envelope.write(KEY, SECRET).unwrap());
        assert_eq!(a.encrypted_dek_source, b.encrypted_dek_source, "same seed");
        assert_ne!(
            a.encrypted_data.get(..44),
            b.encrypted_data.get(..44),
            "different info and nonce"
        );
    }

    #[tokio::test]
    async fn tampering_with_each_region_gives_a_clear_error() {
        let envelope = started(Arc::new(Base64Kek::new())).await;
        let value = envelope.write(KEY, SECRET).unwrap();
        let prefix_len = envelope.prefix().len();

        let mut other_provider = value.clone();
        other_provider[prefix_len - 2] ^= 1;
        let err = envelope.read(KEY, &other_provider).await.unwrap_err();
        assert!(
            matches!(err, Error::WrongPrefix { found: "kms-v2", .. }),
            "another provider's value: {err}"
        );
        let err = envelope.read(KEY, SECRET).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::WrongPrefix {
                    found: "plaintext-protobuf",
                    ..
                }
            ),
            "{err}"
        );

        let truncated = &value[..value.len() - 1];
        assert!(matches!(
            envelope.read(KEY, truncated).await.unwrap_err(),
            Error::Decode(_)
        ));

        let data = decode(&envelope, &value).encrypted_data;
        let start = value.windows(data.len()).position(|w| w == data).unwrap();
        let mut ciphertext = value.clone();
        ciphertext[start + 44] ^= 0x80;
        assert!(matches!(
            envelope.read(KEY, &ciphertext).await.unwrap_err(),
            Error::Authentication
        ));

        let mut info = value.clone();
        info[start] ^= 1;
        assert!(matches!(
            envelope.read(KEY, &info).await.unwrap_err(),
            Error::Authentication
        ));

        let moved = envelope
            .read("/registry/secrets/default/other", &value)
            .await
            .unwrap_err();
        assert!(matches!(moved, Error::Authentication));
        assert!(moved.to_string().contains("wrong AAD"), "{moved}");

        let mut object = decode(&envelope, &value);
        object.encrypted_dek_source = base64::engine::general_purpose::STANDARD
            .encode([0u8; 32])
            .into_bytes();
        let other_seed = [envelope.prefix(), &encrypted_object::marshal(&object)].concat();
        assert!(matches!(
            envelope.read(KEY, &other_seed).await.unwrap_err(),
            Error::Authentication
        ));
        object.encrypted_dek_source = b"not base64!".to_vec();
        let garbage = [envelope.prefix(), &encrypted_object::marshal(&object)].concat();
        let err = envelope.read(KEY, &garbage).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Rpc {
                    method: "Decrypt",
                    code: tonic::Code::InvalidArgument,
                    ..
                }
            ),
            "{err}"
        );

        let mut object = decode(&envelope, &value);
        object.encrypted_dek_source_type = 7;
        let bad_type = [envelope.prefix(), &encrypted_object::marshal(&object)].concat();
        let err = envelope.read(KEY, &bad_type).await.unwrap_err();
        assert!(matches!(err, Error::Invalid(Violation::UnknownType(7))), "{err}");

        for err in [err, moved] {
            let text = format!("{err} {err:?}");
            assert!(
                !text.contains("hunter2") && !text.contains(&hex::encode(SECRET)),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn invalid_stored_objects_fail_to_read() {
        let envelope = started(Arc::new(Base64Kek::new())).await;
        let mut object = decode(&envelope, &envelope.write(KEY, SECRET).unwrap());
        object.annotations.insert("Not_A_Domain".into(), b"x".to_vec());
        let value = [envelope.prefix(), &encrypted_object::marshal(&object)].concat();
        let err = envelope.read(KEY, &value).await.unwrap_err();
        assert!(
            matches!(err, Error::Invalid(Violation::AnnotationKey(_))),
            "{err}"
        );
    }

    #[tokio::test]
    async fn reads_after_a_restart_cost_one_decrypt_per_seed() {
        let kek = Arc::new(Base64Kek::new());
        let before = started(kek.clone()).await;
        let a = before.write("/registry/secrets/ns/a", SECRET).unwrap();
        let b = before.write("/registry/secrets/ns/b", b"k8s\0 another").unwrap();

        let after = started(kek.clone()).await; // a new apiserver: new seed, empty cache
        assert_eq!(
            after
                .read("/registry/secrets/ns/a", &a)
                .await
                .unwrap()
                .0
                .as_slice(),
            SECRET
        );
        assert_eq!(
            after
                .read("/registry/secrets/ns/b", &b)
                .await
                .unwrap()
                .0
                .as_slice(),
            b"k8s\0 another"
        );
        assert_eq!(kek.decrypt_calls(), 1);
        let stats = after.stats();
        assert_eq!((stats.decrypt_calls, stats.cache_hits), (1, 1));
        assert_eq!(
            stats.cache_entries, 1,
            "the new state's own seed is cached on its first write only"
        );
    }

    #[tokio::test]
    async fn decrypt_gets_the_stored_key_id_and_annotations_and_a_fresh_uid() {
        let plugin = Arc::new(Tweaked::default());
        let writer = started(plugin.clone()).await;
        let value = writer.write(KEY, SECRET).unwrap();
        plugin.kek.set_key_id("2");
        let reader = started(plugin.clone()).await;
        let (plaintext, stale) = reader.read(KEY, &value).await.unwrap();
        assert_eq!((plaintext.as_slice(), stale), (SECRET, true));
        let decrypts = plugin.decrypts.lock().unwrap().clone();
        let [(uid, request)] = decrypts.as_slice() else {
            panic!("{} decrypts", decrypts.len())
        };
        assert_eq!(request.key_id, "1", "the stored key ID, not the current one");
        assert_eq!(request.annotations, decode(&writer, &value).annotations);
        let uid = uuid::Uuid::parse_str(uid).unwrap();
        assert_eq!(uid.get_version_num(), 4);
    }

    #[tokio::test]
    async fn rotation_installs_a_new_seed_only_when_the_key_id_changes() {
        let kek = Arc::new(Base64Kek::new());
        let envelope = started(kek.clone()).await;
        let old = envelope.write(KEY, SECRET).unwrap();
        assert_eq!(
            envelope.refresh().await.unwrap(),
            Probe {
                key_id: "1".into(),
                rotated: false
            }
        );
        assert_eq!(kek.encrypt_calls(), 1, "same key ID: no Encrypt");

        kek.set_key_id("2");
        assert_eq!(
            envelope.refresh().await.unwrap(),
            Probe {
                key_id: "2".into(),
                rotated: true
            }
        );
        assert_eq!(kek.encrypt_calls(), 2);
        assert_eq!(envelope.key_id().as_deref(), Some("2"));
        let new = envelope.write(KEY, SECRET).unwrap();
        assert_eq!(decode(&envelope, &new).key_id, "2");
        assert_ne!(
            decode(&envelope, &new).encrypted_dek_source,
            decode(&envelope, &old).encrypted_dek_source
        );

        assert!(envelope.read(KEY, &old).await.unwrap().1, "old key ID: stale");
        assert!(!envelope.read(KEY, &new).await.unwrap().1);
        assert_eq!(kek.decrypt_calls(), 0, "both seeds were cached when written");
    }

    #[tokio::test]
    async fn rotation_keeps_the_old_state_when_encrypt_and_status_key_ids_differ() {
        let clock = Arc::new(ManualClock::new());
        let plugin = Arc::new(Tweaked::default());
        let envelope = Envelope::new("kms-provider", plugin.clone())
            .unwrap()
            .with_clock(clock.clone());
        envelope.refresh().await.unwrap();
        let before = decode(&envelope, &envelope.write(KEY, SECRET).unwrap());

        plugin.kek.set_key_id("2");
        set(&plugin.encrypt_key_id, "3".to_owned());
        clock.advance(Duration::from_secs(100));
        let Error::Unhealthy { problems, .. } = envelope.refresh().await.unwrap_err() else {
            panic!()
        };
        assert!(
            matches!(problems.as_slice(), [Error::KeyIdMismatch { .. }]),
            "{problems:?}"
        );
        assert!(!envelope.healthy());
        assert_eq!(envelope.key_id().as_deref(), Some("1"));
        let after = decode(&envelope, &envelope.write(KEY, SECRET).unwrap());
        assert_eq!(
            after.encrypted_dek_source, before.encrypted_dek_source,
            "old seed still writes"
        );

        // ...and the old expiry: 3 min after the last good probe, not after the failed one.
        clock.advance(Duration::from_secs(81));
        assert!(matches!(envelope.write(KEY, SECRET), Err(Error::Expired { .. })));
    }

    #[tokio::test]
    async fn writes_expire_three_minutes_after_the_last_good_probe_but_reads_do_not() {
        let clock = Arc::new(ManualClock::new());
        let kek = Arc::new(Base64Kek::new());
        let envelope = Envelope::new("kms-provider", kek.clone())
            .unwrap()
            .with_clock(clock.clone());
        envelope.refresh().await.unwrap();
        let value = envelope.write(KEY, SECRET).unwrap();

        kek.set_failed(true);
        assert!(matches!(
            envelope.refresh().await,
            Err(Error::Rpc {
                code: tonic::Code::FailedPrecondition,
                ..
            })
        ));
        clock.advance(WRITE_STATE_TTL);
        assert!(
            envelope.write(KEY, SECRET).is_ok(),
            "exactly at the expiry still writes"
        );
        clock.advance(Duration::from_secs(1));
        let err = envelope.write(KEY, SECRET).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        assert_eq!(envelope.read(KEY, &value).await.unwrap().0.as_slice(), SECRET);

        kek.set_failed(false);
        envelope.refresh().await.unwrap();
        assert!(envelope.write(KEY, SECRET).is_ok());
        assert_eq!(
            kek.encrypt_calls(),
            1,
            "recovery with the same key ID keeps the seed"
        );
    }

    #[tokio::test]
    async fn without_a_good_probe_reads_and_writes_fail() {
        let writer = started(Arc::new(Base64Kek::new())).await;
        let value = writer.write(KEY, SECRET).unwrap();
        let kek = Arc::new(Base64Kek::new());
        kek.set_failed(true);
        let envelope = Envelope::new("kms-provider", kek).unwrap();
        assert!(envelope.refresh().await.is_err());
        assert!(matches!(envelope.write(KEY, SECRET), Err(Error::NoState)));
        assert!(matches!(envelope.read(KEY, &value).await, Err(Error::NoState)));
    }

    #[tokio::test]
    async fn bad_plugin_answers_are_rejected_like_the_apiserver_does() {
        let plugin = Arc::new(Tweaked::default());
        let envelope = Envelope::new("kms-provider", plugin.clone()).unwrap();
        set(
            &plugin.encrypt_annotations,
            BTreeMap::from([("kms.example.io/x".to_owned(), b"1".to_vec())]),
        );
        let err = envelope.refresh().await.unwrap_err();
        assert!(
            err.to_string().contains("not a fully qualified domain name"),
            "{err}"
        );
        assert_eq!(envelope.key_id(), None);

        *plugin.encrypt_annotations.lock().unwrap() = None;
        set(&plugin.status_healthz, "disk on fire".to_owned());
        let err = envelope.refresh().await.unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(
            envelope.key_id().as_deref(),
            Some("1"),
            "rotation runs even when healthz is not ok"
        );

        *plugin.status_healthz.lock().unwrap() = None;
        set(&plugin.status_version, "v2beta1".to_owned());
        let err = envelope.refresh().await.unwrap_err();
        assert!(
            matches!(&err, Error::Unhealthy { problems, .. } if matches!(problems.as_slice(), [Error::VersionChanged { .. }])),
            "{err}"
        );
        set(&plugin.status_version, "v1".to_owned());
        assert!(
            envelope
                .refresh()
                .await
                .unwrap_err()
                .to_string()
                .contains("\"v1\"")
        );
    }

    #[tokio::test]
    async fn decrypted_seed_and_key_lengths_are_checked() {
        let plugin = Arc::new(Tweaked::default());
        let writer = started(plugin.clone()).await;
        let value = writer.write(KEY, SECRET).unwrap();
        let reader = started(plugin.clone()).await;
        set(&plugin.decrypt_answer, vec![0; 31]);
        let err = reader.read(KEY, &value).await.unwrap_err();
        assert!(matches!(err, Error::DekSourceLength { len: 31, .. }), "{err}");
    }

    #[tokio::test]
    async fn legacy_aes_gcm_key_values_read_and_are_stale() {
        let envelope = started(Arc::new(Base64Kek::new())).await;
        let dek = [0x42u8; 32];
        let object = EncryptedObject {
            encrypted_data: Gcm::new(&dek)
                .unwrap()
                .seal(&[9; 12], SECRET, KEY.as_bytes())
                .unwrap(),
            key_id: "1".into(),
            encrypted_dek_source: base64::engine::general_purpose::STANDARD.encode(dek).into_bytes(),
            annotations: BTreeMap::new(),
            encrypted_dek_source_type: 0,
        };
        let value = [envelope.prefix(), &encrypted_object::marshal(&object)].concat();
        let (plaintext, stale) = envelope.read(KEY, &value).await.unwrap();
        assert_eq!(
            (plaintext.as_slice(), stale),
            (SECRET, true),
            "same key ID but type 0: stale"
        );

        let mut short = object;
        short.encrypted_dek_source = base64::engine::general_purpose::STANDARD
            .encode([1u8; 20])
            .into_bytes();
        let value = [envelope.prefix(), &encrypted_object::marshal(&short)].concat();
        assert!(matches!(
            envelope.read(KEY, &value).await,
            Err(Error::DekSourceLength { len: 20, .. })
        ));
    }

    #[tokio::test]
    async fn a_decrypt_failure_keeps_the_grpc_code() {
        let writer = started(Arc::new(Base64Kek::new())).await;
        let value = writer.write(KEY, SECRET).unwrap();
        let kek = Arc::new(Base64Kek::new());
        let reader = started(kek.clone()).await;
        kek.set_failed(true);
        let err = reader.read(KEY, &value).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Rpc {
                    method: "Decrypt",
                    code: tonic::Code::FailedPrecondition,
                    ..
                }
            ),
            "{err}"
        );
    }
}
