//! `verify`: write a canary Secret through the API, read its raw etcd value and check it is KMS v2
//! from the expected provider under the expected key ID with none of the canary in clear, read it back
//! through the API, delete it. The canary is random, so no two runs (or clusters) share one.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use rand::RngCore as _;

use crate::apiserver::EtcdStore;
use crate::apiserver::object::Keys;
use crate::audit::{Class, KmsV2Value, classify};

/// The data key the canary value is stored under.
const CANARY_KEY: &str = "canary";

/// What to check.
#[derive(Clone, Debug)]
pub struct Expect {
    /// Namespace the canary is written to.
    pub namespace: String,
    /// The apiserver's `--etcd-prefix`.
    pub keys: Keys,
    /// Provider name the value must carry, if given.
    pub provider: Option<String>,
    /// Key ID the value must carry, if given.
    pub key_id: Option<String>,
}

/// What a run saw: one line per step, and the checks that failed (empty: verified).
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Steps, in order, for the user.
    pub lines: Vec<String>,
    /// Failed checks, each with its reason.
    pub failures: Vec<String>,
    /// The stored value's KMS v2 metadata, when it was KMS v2.
    pub stored: Option<KmsV2Value>,
}

impl Verdict {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    fn fail(&mut self, reason: String) {
        self.lines.push(format!("FAIL: {reason}"));
        self.failures.push(reason);
    }
}

/// Runs the canary through `client`'s API and `etcd`. Errors are failures to run (API or etcd
/// unreachable); a value that is not as expected is a [`Verdict`] with failures.
pub async fn verify(client: kube::Client, etcd: &EtcdStore, expect: &Expect) -> Result<Verdict> {
    let api: Api<Secret> = Api::namespaced(client, &expect.namespace);
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let name = format!("kleidi-verify-{}", hex::encode(&bytes[..4]));
    // Hex of random bytes: printable, so an in-clear copy shows up in `etcdctl get` too.
    let canary = hex::encode(bytes);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "kleidi-harness".to_owned(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            CANARY_KEY.to_owned(),
            ByteString(canary.clone().into_bytes()),
        )])),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    let created = api
        .create(&PostParams::default(), &secret)
        .await
        .with_context(|| format!("creating canary Secret {}/{name}", expect.namespace))?;
    let mut verdict = Verdict::default();
    verdict.lines.push(format!(
        "created Secret {}/{name} (resourceVersion {})",
        expect.namespace,
        created.metadata.resource_version.as_deref().unwrap_or("?")
    ));
    // Whatever the checks find, the canary is deleted; errors come after.
    let checked = check(&api, etcd, expect, &name, &canary, &mut verdict).await;
    let deleted = api.delete(&name, &DeleteParams::default()).await;
    checked?;
    deleted.with_context(|| format!("deleting canary Secret {}/{name}", expect.namespace))?;
    let key = expect.keys.secret(&expect.namespace, &name);
    match etcd.get(key.as_bytes()).await? {
        None => verdict.lines.push(format!("deleted; {key} is gone from etcd")),
        Some(_) => verdict.fail(format!("{key} is still in etcd after the delete")),
    }
    Ok(verdict)
}

async fn check(
    api: &Api<Secret>,
    etcd: &EtcdStore,
    expect: &Expect,
    name: &str,
    canary: &str,
    verdict: &mut Verdict,
) -> Result<()> {
    let key = expect.keys.secret(&expect.namespace, name);
    let Some(raw) = etcd.get(key.as_bytes()).await? else {
        verdict.fail(format!(
            "no value at {key} in etcd: is this the cluster's etcd, and --etcd-prefix its --etcd-prefix?"
        ));
        return Ok(());
    };
    let class = classify(&raw);
    verdict.lines.push(format!("etcd {key}: {class}"));
    if raw.windows(canary.len()).any(|w| w == canary.as_bytes()) {
        verdict.fail(format!("the canary value is in clear in etcd at {key}"));
    }
    match &class {
        Class::KmsV2(v) => {
            if let Some(problem) = &v.problem {
                verdict.fail(format!("the stored EncryptedObject is invalid: {problem}"));
            }
            if let Some(want) = &expect.provider
                && *want != v.provider
            {
                verdict.fail(format!("provider is {:?}, expected {want:?}", v.provider));
            }
            if let Some(want) = &expect.key_id
                && *want != v.key_id
            {
                verdict.fail(format!("key_id is {:?}, expected {want:?}", v.key_id));
            }
            verdict.stored = Some(v.clone());
        }
        other => verdict.fail(format!("stored as {}, not KMS v2", other.label())),
    }
    let read = api
        .get(name)
        .await
        .with_context(|| format!("reading back {name}"))?;
    let value = read
        .data
        .as_ref()
        .and_then(|d| d.get(CANARY_KEY))
        .map(|v| v.0.as_slice());
    if value == Some(canary.as_bytes()) {
        verdict
            .lines
            .push("read back through the API: the same value".into());
    } else {
        verdict.fail("reading back through the API gave another value".into());
    }
    Ok(())
}
