//! One KEK shared by three control-plane nodes, each with its own swtpm: enrolment by
//! export-parent / approve / export / import, seeds crossing nodes, a node never enrolled, and
//! duplications the TPM refuses without the admin's approval. Needs `apt-get install swtpm
//! swtpm-tools libtss2-dev`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

#[path = "common/swtpm.rs"]
mod swtpm;

use std::path::{Path, PathBuf};

use kleidi::backend::tpm::{self, TpmBackend};
use kleidi::{Encrypted, Error, KeyService};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice};
use swtpm::Node;

impl Node {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `kleidi tpm export-parent` on this node.
    async fn parent(&self) -> PathBuf {
        let out = self.file("parent");
        tpm::export_parent(&self.config(), &out).await.unwrap();
        out
    }
}

/// The administrator's machine: the offline signing key.
struct Admin {
    dir: tempfile::TempDir,
}

impl Admin {
    async fn new() -> Self {
        let admin = Admin {
            dir: tempfile::tempdir().unwrap(),
        };
        tpm::admin_key(&admin.key()).await.unwrap();
        admin
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("admin")
    }

    fn public(&self) -> PathBuf {
        self.dir.path().join("admin.pub")
    }

    /// `kleidi tpm approve` for the node whose parent file is `parent`.
    async fn approve(&self, parent: &Path, name: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        tpm::approve(&self.key(), parent, &out).await.unwrap();
        out
    }
}

/// Enrols `to` with the current KEK of `from`: the four steps of the README.
async fn enrol(admin: &Admin, from: &Node, to: &Node, name: &str) -> String {
    let parent = to.parent().await;
    let approval = admin.approve(&parent, &format!("{name}.approval")).await;
    let exported = from.file(&format!("{name}.kek"));
    let key_id = tpm::export(&from.config(), None, &parent, &approval, &exported)
        .await
        .unwrap();
    assert_eq!(tpm::import(&to.config(), &exported).await.unwrap(), key_id);
    key_id
}

fn seed() -> SecretSlice<u8> {
    let mut s = vec![0u8; 32];
    rand::rng().fill_bytes(&mut s);
    SecretSlice::from(s)
}

async fn wrap(backend: &TpmBackend) -> (SecretSlice<u8>, Encrypted) {
    let plaintext = seed();
    let encrypted = backend.encrypt("uid", &plaintext).await.unwrap();
    (plaintext, encrypted)
}

#[tokio::test]
async fn a_seed_wrapped_on_one_node_unwraps_on_every_enrolled_node() {
    let admin = Admin::new().await;
    let (a, b, c) = (Node::new(), Node::new(), Node::new());
    let key_id = tpm::init_shareable(&a.config(), &admin.public()).await.unwrap();
    assert_eq!(enrol(&admin, &a, &b, "b").await, key_id);
    assert_eq!(enrol(&admin, &a, &c, "c").await, key_id);

    let (ka, kb, kc) = (a.backend().await, b.backend().await, c.backend().await);
    for backend in [&ka, &kb, &kc] {
        assert_eq!(
            backend.current_key_id().await.unwrap(),
            key_id,
            "one key_id everywhere"
        );
    }
    let (plaintext, encrypted) = wrap(&ka).await;
    assert_eq!(encrypted.key_id, key_id);
    for backend in [&kb, &kc] {
        let back = backend.decrypt("uid", &encrypted).await.unwrap();
        assert_eq!(back.expose_secret(), plaintext.expose_secret());
    }
    // And back: what C wraps, A and B unwrap.
    let (plaintext, encrypted) = wrap(&kc).await;
    for backend in [&ka, &kb] {
        let back = backend.decrypt("uid", &encrypted).await.unwrap();
        assert_eq!(back.expose_secret(), plaintext.expose_secret());
    }
}

#[tokio::test]
async fn a_node_never_enrolled_cannot_unwrap_and_never_sees_garbage() {
    let admin = Admin::new().await;
    let (a, b, d) = (Node::new(), Node::new(), Node::new());
    tpm::init_shareable(&a.config(), &admin.public()).await.unwrap();
    enrol(&admin, &a, &b, "b").await;
    tpm::init(&d.config()).await.unwrap();
    let (_, encrypted) = wrap(&a.backend().await).await;

    let kd = d.backend().await;
    match kd.decrypt("uid", &encrypted).await {
        Err(Error::BadCiphertext(msg)) => assert!(msg.contains("unknown key"), "{msg}"),
        other => panic!("a node without the key: {other:?}"),
    }
    // The export made for B does not import on D: it is wrapped to B's parent.
    let err = tpm::import(&d.config(), &a.file("b.kek")).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    // Root on D with a copy of A's state directory: A's blob does not load under D's parent.
    let name = encrypted.key_id.strip_prefix("tpm:").unwrap();
    std::fs::copy(
        a.config().state_dir.join(format!("{name}.kek")),
        d.config().state_dir.join(format!("{name}.kek")),
    )
    .unwrap();
    match kd.decrypt("uid", &encrypted).await {
        Err(err @ Error::Unavailable { .. }) => assert_eq!(err.class(), "key_lost", "{err}"),
        other => panic!("a copied blob: {other:?}"),
    }
}

#[tokio::test]
async fn an_export_without_the_admins_approval_is_refused() {
    let admin = Admin::new().await;
    let (a, b, rogue) = (Node::new(), Node::new(), Node::new());
    tpm::init_shareable(&a.config(), &admin.public()).await.unwrap();
    let (b_parent, rogue_parent) = (b.parent().await, rogue.parent().await);
    let out = a.file("out.kek");

    // No approval at all: garbage where the approval should be.
    std::fs::write(a.file("empty"), b"").unwrap();
    let err = tpm::export(&a.config(), None, &rogue_parent, &a.file("empty"), &out)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");

    // B's approval presented for another parent.
    let for_b = admin.approve(&b_parent, "b.approval").await;
    let err = tpm::export(&a.config(), None, &rogue_parent, &for_b, &out)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("approval is for parent"), "{err}");

    // Root on A makes its own "admin" key and approves its own parent: the TPM refuses, because
    // the KEK's policy names the real admin key.
    let forger = Admin::new().await;
    let forged = forger.approve(&rogue_parent, "forged.approval").await;
    let err = tpm::export(&a.config(), None, &rogue_parent, &forged, &out)
        .await
        .unwrap_err();
    match &err {
        Error::Denied { class, .. } => assert_eq!(*class, "approval_refused", "{err}"),
        other => panic!("a forged approval: {other:?}"),
    }
    assert!(!out.exists(), "nothing written on a refusal");
}

#[tokio::test]
async fn a_node_bound_key_cannot_be_exported_and_keeps_decrypting_beside_a_shareable_one() {
    let admin = Admin::new().await;
    let (a, b) = (Node::new(), Node::new());
    let bound = tpm::init(&a.config()).await.unwrap();
    let (plaintext, old) = wrap(&a.backend().await).await;
    let b_parent = b.parent().await;
    let approval = admin.approve(&b_parent, "b.approval").await;
    let err = tpm::export(&a.config(), None, &b_parent, &approval, &a.file("out.kek"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bound to this TPM"), "{err}");

    let shared = tpm::init_shareable(&a.config(), &admin.public()).await.unwrap();
    assert_ne!(shared, bound);
    let ka = a.backend().await;
    assert_eq!(ka.current_key_id().await.unwrap(), shared);
    let back = ka.decrypt("uid", &old).await.unwrap();
    assert_eq!(back.expose_secret(), plaintext.expose_secret());
}

/// Runs `kleidi tpm ARGS` and returns what it printed.
fn kleidi_tpm(node: Option<&Node>, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kleidi"));
    cmd.arg("tpm").args(args).env("TSS2_LOG", "all+none");
    if let Some(node) = node {
        cmd.env("KLEIDI_TPM_TCTI", node.tpm.tcti())
            .env("KLEIDI_TPM_STATE_DIR", node.config().state_dir);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "kleidi tpm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn the_enrolment_commands_print_one_key_id_on_both_nodes() {
    let (a, b) = (Node::new(), Node::new());
    let admin = tempfile::tempdir().unwrap();
    let path = |dir: &tempfile::TempDir, name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (key, public) = (path(&admin, "admin"), path(&admin, "admin.pub"));
    let (parent, approval, exported) = (
        path(&b.dir, "b.parent"),
        path(&admin, "b.approval"),
        path(&a.dir, "b.kek"),
    );

    kleidi_tpm(None, &["admin-key", "--out", &key]);
    let key_id = kleidi_tpm(Some(&a), &["init", "--shareable", "--admin-pub", &public]);
    let parent_name = kleidi_tpm(Some(&b), &["export-parent", "--out", &parent]);
    let approved = kleidi_tpm(
        None,
        &[
            "approve",
            "--admin-key",
            &key,
            "--to",
            &parent,
            "--out",
            &approval,
        ],
    );
    assert_eq!(
        approved, parent_name,
        "approve shows the Name the new node printed"
    );
    let exported_id = kleidi_tpm(
        Some(&a),
        &[
            "export",
            "--to",
            &parent,
            "--approval",
            &approval,
            "--out",
            &exported,
        ],
    );
    assert_eq!(exported_id, key_id);
    assert_eq!(kleidi_tpm(Some(&b), &["import", &exported]), key_id);
    let (plaintext, encrypted) = wrap(&a.backend().await).await;
    let back = b.backend().await.decrypt("uid", &encrypted).await.unwrap();
    assert_eq!(back.expose_secret(), plaintext.expose_secret());
}
