//! One KEK for every control-plane node, never in clear outside a TPM.
//!
//! **Design: PolicyAuthorize by an offline admin key.** A shareable KEK (`kleidi tpm init
//! --shareable --admin-pub FILE`) is the usual storage key without fixedTPM/fixedParent, and with
//! authPolicy = TPM2_PolicyAuthorize(keySign = the admin's ECDSA P-256 key, policyRef
//! [`POLICY_REF`](super::approval::POLICY_REF)). TPM2_Duplicate needs the DUP role, which only a
//! policy session satisfying that authPolicy gives; and only a policy the admin key signed
//! satisfies it. The admin signs, per node, PolicyDuplicationSelect(newParentName = that node's
//! storage parent): an *approval* (`kleidi tpm approve`). Enrolling node B:
//!
//! 1. on B: `kleidi tpm export-parent --out b.parent` (B's owner primary, public part);
//! 2. offline, on the admin's machine: `kleidi tpm approve --admin-key admin --to b.parent --out b.approval`;
//! 3. on A (which holds the KEK): `kleidi tpm export --to b.parent --approval b.approval --out b.kek`:
//!    TPM2_VerifySignature of the approval (admin key loaded in the owner hierarchy, so the ticket
//!    is a real one), a policy session with PolicyDuplicationSelect(B's parent) and
//!    PolicyAuthorize, then TPM2_Duplicate to B's parent loaded as a public key only. The file
//!    holds the KEK's public area and its private area wrapped to B's parent (outer wrapper: a
//!    seed by ECDH with B's parent, HMAC-protected);
//! 4. on B: `kleidi tpm import b.kek`: TPM2_Import under B's primary, stored like any KEK, current.
//!
//! The KEK's Name, and so its key_id, is the same on every node; seeds sealed on one node unseal on
//! every enrolled node. An approval names a parent, not a KEK (includeObject = NO): a rotation
//! (`init --shareable` again, then export/import) needs no new approvals.
//!
//! **Threat model.** *Who can copy the KEK:* only a TPM whose storage parent an admin approval
//! names, and only in TPM-wrapped form; the TPM refuses TPM2_Duplicate to any other parent, to a
//! software key, or to the NULL parent (clear text) unless the admin key signed that parent.
//! *Root on one node* can use the KEK there (unseal every seed that node's TPM can reach, for as
//! long as it holds the node: the same as any plugin), read the approvals and the state directory,
//! and duplicate the KEK to nodes already approved; it cannot obtain the KEK in clear nor move it to
//! a TPM or key of its choosing, since a self-made admin key or approval does not satisfy the
//! KEK's policy (tested). *The admin key* is the root of trust: whoever holds it can approve any
//! parent, including a software key, and so recover the KEK; keep it offline. kleidi does not
//! attest parents (no EK certificate check): approve only parent files taken from the new node
//! over a trusted channel, and compare the Name `export-parent` printed there with the one
//! `approve` prints. `import` trusts its file the same way: compare the key_id it prints with the
//! cluster's. KEKs made by plain `kleidi tpm init` stay fixedTPM and can never leave their TPM.

use std::path::Path;

use tss_esapi::structures::Digest;

use super::approval::{
    AdminPublic, Approval, ExportFile, ParentFile, approval_hash, approved_policy, generate_admin_key,
    kek_policy, write_new,
};
use super::device::{Approved, Connection, ecdsa_signature};
use super::errors::library;
use super::format::{self, name_of};
use super::{TpmConfig, blocking, open, state, validate};
use crate::{Error, Result};

/// `kleidi tpm admin-key --out FILE`: the admin's signing key (`FILE`, PKCS#8, 0400) and its public
/// part (`FILE.pub`). No TPM involved. Returns the public key's hex Name.
pub async fn admin_key(out: &Path) -> Result<String> {
    let out = out.to_owned();
    blocking(move || Ok(hex::encode(generate_admin_key(&out)?.name()?))).await
}

/// `kleidi tpm approve`: signs that shareable KEKs of this admin key may be duplicated to the parent
/// in `parent` (from `export-parent` on the new node). No TPM involved. Returns the parent's hex Name.
pub async fn approve(admin_key: &Path, parent: &Path, out: &Path) -> Result<String> {
    let (admin_key, parent, out) = (admin_key.to_owned(), parent.to_owned(), out.to_owned());
    blocking(move || {
        let parent = ParentFile::read(&parent)?;
        let approval = Approval::sign(&admin_key, &parent)?;
        write_new(&out, &approval.encode()?, 0o644)?;
        Ok(hex::encode(&approval.parent_name))
    })
    .await
}

/// `kleidi tpm init --shareable --admin-pub FILE`: a new current KEK whose duplication the admin key
/// in `FILE` must approve. Returns its key_id.
pub async fn init_shareable(cfg: &TpmConfig, admin_pub: &Path) -> Result<String> {
    validate(cfg)?;
    let (cfg, admin_pub) = (cfg.clone(), admin_pub.to_owned());
    blocking(move || {
        let admin = AdminPublic::read(&admin_pub)?;
        let policy =
            Digest::try_from(kek_policy(&admin.name()?).to_vec()).map_err(|e| library("kek policy", e))?;
        let kek = open(&cfg)?.create_kek(format::shareable_kek_template(policy)?)?;
        state::add_current(&cfg.state_dir, &kek)
    })
    .await
}

/// `kleidi tpm export-parent --out FILE`: this node's storage parent, public part. Returns its hex Name.
pub async fn export_parent(cfg: &TpmConfig, out: &Path) -> Result<String> {
    validate(cfg)?;
    let (cfg, out) = (cfg.clone(), out.to_owned());
    blocking(move || {
        let parent = ParentFile {
            public: open(&cfg)?.parent_public().clone(),
        };
        write_new(&out, &parent.encode()?, 0o644)?;
        Ok(hex::encode(parent.name()?))
    })
    .await
}

/// `kleidi tpm export`: duplicates the shareable KEK `key_id` (default: the current one) to the
/// parent in `to`, under the admin's `approval`, into `out`. Returns the key_id.
pub async fn export(
    cfg: &TpmConfig,
    key_id: Option<String>,
    to: &Path,
    approval: &Path,
    out: &Path,
) -> Result<String> {
    validate(cfg)?;
    let (cfg, to, approval, out) = (cfg.clone(), to.to_owned(), approval.to_owned(), out.to_owned());
    blocking(move || {
        let ring = state::read(&cfg.state_dir)?;
        let key_id = key_id
            .or(ring.current.clone())
            .ok_or_else(|| Error::Config(format!("{} holds no TPM key", cfg.state_dir.display())))?;
        let kek = ring.keys.get(&key_id).ok_or_else(|| {
            Error::Config(format!("no key {key_id} in {}", cfg.state_dir.display()))
        })?;
        if kek.public.object_attributes().fixed_tpm() {
            return Err(Error::Config(format!(
                "key {key_id} is bound to this TPM; only keys made by `kleidi tpm init --shareable` can be exported"
            )));
        }
        let parent = ParentFile::read(&to)?;
        let approval = Approval::read(&approval)?;
        let parent_name = parent.name()?;
        // A mix-up of files, said plainly; the TPM would refuse it too.
        if approval.parent_name != parent_name {
            return Err(Error::Config(format!(
                "the approval is for parent {}, not for {} ({})",
                hex::encode(&approval.parent_name),
                hex::encode(&parent_name),
                to.display()
            )));
        }
        let admin = approval.admin.public()?;
        let approved = approved_policy(&parent_name);
        let to_parent = Approved {
            admin_name: name_of(&admin)?,
            admin,
            parent: parent.public,
            parent_name: parent_name.clone(),
            kek_name: kek.name()?,
            approved,
            approval_hash: approval_hash(&approved),
            signature: ecdsa_signature(&approval.signature)?,
        };
        let (duplicate, seed) = open(&cfg)?.duplicate(&key_id, kek, &to_parent)?;
        let file = ExportFile {
            kek: kek.public.clone(),
            duplicate,
            seed,
            parent_name,
        };
        write_new(&out, &file.encode()?, 0o600)?;
        Ok(key_id)
    })
    .await
}

/// `kleidi tpm import FILE`: imports a KEK exported to this node's parent and makes it current.
/// Returns its key_id.
pub async fn import(cfg: &TpmConfig, file: &Path) -> Result<String> {
    validate(cfg)?;
    let (cfg, path) = (cfg.clone(), file.to_owned());
    blocking(move || {
        let file = ExportFile::read(&path)?;
        if !format::is_shareable_kek(&file.kek) {
            return Err(Error::Config(format!(
                "{} does not hold a kleidi shareable KEK",
                path.display()
            )));
        }
        let key_id = format::key_id(&name_of(&file.kek)?);
        let mut conn: Connection = open(&cfg)?;
        let parent_name = name_of(conn.parent_public())?;
        if file.parent_name != parent_name {
            return Err(Error::Config(format!(
                "{} was exported to parent {}; this node's parent is {} (`kleidi tpm export-parent`)",
                path.display(),
                hex::encode(&file.parent_name),
                hex::encode(&parent_name)
            )));
        }
        let blob = conn.import(&key_id, file.kek, file.duplicate, file.seed)?;
        state::add_current(&cfg.state_dir, &blob)
    })
    .await
}
