//! A real swtpm (Debian `swtpm`) as a local process: TPM 2.0 on two adjacent free 127.0.0.1 ports
//! (the swtpm TCTI finds the control channel at port + 1), its NVRAM state in its own temp dir,
//! and a directory for kleidi's TPM-wrapped keys beside it. Fault verbs and what survives them:
//! `kill` (state stays on disk), `restart` (killed and started on the same state: a rebooted
//! TPM), `pause`/`resume` (SIGSTOP: the TPM hangs), `wipe` (started on empty state: a cleared
//! TPM, a replaced board). Readiness is a real TPM round trip (TPM2_GetRandom), not a port check.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::Process;
use super::etcd::which;

const READY_LIMIT: Duration = Duration::from_secs(20);

/// One software TPM for one node of a run.
pub struct Swtpm {
    /// The process (fault verbs also on it: stop, kill, pause, …).
    pub process: Process,
    port: u16,
    dir: tempfile::TempDir,
}

impl Swtpm {
    /// Starts swtpm on fresh state and waits until it answers a TPM command.
    pub async fn start() -> Result<Self> {
        let bin = which("swtpm")
            .context("swtpm is not installed: run `just deps` (apt-get install swtpm swtpm-tools)")?;
        let dir = tempfile::Builder::new().prefix("kleidi-swtpm-").tempdir()?;
        std::fs::create_dir(dir.path().join("state"))?;
        let port = free_port_pair()?;
        let args: Vec<String> = [
            "socket",
            "--tpm2",
            "--server",
            &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
            "--ctrl",
            &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
            "--tpmstate",
            &format!("dir={}", dir.path().join("state").display()),
            "--flags",
            "not-need-init,startup-clear",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let process = Process::spawn("swtpm", &bin, &args, &[], &dir.path().join("swtpm.log"))?;
        let tpm = Swtpm { process, port, dir };
        tpm.wait_ready(READY_LIMIT).await?;
        Ok(tpm)
    }

    /// `--tpm-tcti` for kleidi.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// `--tpm-state-dir` for kleidi: its TPM-wrapped keys for this TPM.
    pub fn kleidi_state_dir(&self) -> PathBuf {
        self.dir.path().join("kleidi")
    }

    /// swtpm's own NVRAM state (what [`Swtpm::wipe`] deletes).
    pub fn tpm_state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The scratch dir (logs and sockets may go here too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The backend flags of `kleidi serve` (and `kleidi tpm …`) for this TPM.
    pub fn kleidi_flags(&self) -> Vec<String> {
        vec![
            "--backend".into(),
            "tpm".into(),
            "--tpm-tcti".into(),
            self.tcti(),
            "--tpm-state-dir".into(),
            self.kleidi_state_dir().display().to_string(),
        ]
    }

    /// SIGKILL: the TPM is gone; its state stays on disk.
    pub async fn kill(&mut self) -> Result<()> {
        self.process.kill().await
    }

    /// Starts it again after a kill or stop, on the same state and ports, and waits until it answers.
    pub async fn start_again(&mut self) -> Result<()> {
        self.process.start()?;
        self.wait_ready(READY_LIMIT).await
    }

    /// Killed and started on the same state: a rebooted TPM (every loaded object and session gone).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.start_again().await
    }

    /// SIGSTOP: the TPM holds its sockets and answers nothing.
    pub fn pause(&self) -> Result<()> {
        self.process.pause()
    }

    /// Undoes [`Swtpm::pause`].
    pub fn resume(&self) -> Result<()> {
        self.process.resume()
    }

    /// Killed, its state deleted, started again on the same ports: a TPM that lost every key.
    /// kleidi's state directory stays (its blobs no longer load).
    pub async fn wipe(&mut self) -> Result<()> {
        self.kill().await?;
        std::fs::remove_dir_all(self.tpm_state_dir())?;
        std::fs::create_dir(self.tpm_state_dir())?;
        self.start_again().await
    }

    /// Waits until the TPM answers a command ([`crate::images::swtpm::answers`]).
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let command = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        crate::images::poll("swtpm", limit, || crate::images::swtpm::answers(command))
            .await
            .map_err(|e| e.context(format!("swtpm log:\n{}", self.process.logs())))
    }

    /// `kleidi tpm init` on this TPM: a new current key. Returns its key_id.
    pub async fn init_key(&self, kleidi: &Path) -> Result<String> {
        self.access().init_key(kleidi).await
    }

    /// What enrolment needs of it.
    pub fn access(&self) -> TpmAccess {
        TpmAccess {
            tcti: self.tcti(),
            state_dir: self.kleidi_state_dir(),
        }
    }
}

/// How the harness reaches one node's TPM (`--tpm-tcti`) and where that node's kleidi keeps its
/// TPM-wrapped keys (`--tpm-state-dir`, a host directory): all that `kleidi tpm` enrolment and
/// rotation need, whether the TPM is a local swtpm or a container's.
#[derive(Clone, Debug)]
pub struct TpmAccess {
    /// The TCTI string reaching the TPM from the host.
    pub tcti: String,
    /// kleidi's state directory for this TPM.
    pub state_dir: PathBuf,
}

impl TpmAccess {
    /// `kleidi tpm init` on this TPM (the command a user runs): a new current key. Returns its key_id.
    pub async fn init_key(&self, kleidi: &Path) -> Result<String> {
        kleidi_tpm(kleidi, Some((self, &self.state_dir)), &["init"]).await
    }
}

/// One KEK shared by the TPMs of several control-plane nodes, enrolled as an operator does it (README,
/// "Enrolling control-plane nodes"): `kleidi tpm admin-key`, `init --shareable` on node 0, then for
/// every other node `export-parent` there, `approve` with the admin key, `export` on node 0 and
/// `import` on the node. The admin key, the parent files, the approvals and the exported copies stay
/// in this handle's temp dir (deleted on drop); a rotation reuses the approvals, as the README says.
pub struct SharedKek {
    dir: tempfile::TempDir,
    key_id: String,
    rotations: u32,
}

impl SharedKek {
    /// Enrols one new shareable KEK on every TPM of `tpms` (node 0 first), each with its own
    /// [`TpmAccess::state_dir`]. Run before the nodes' plugins start: each import makes the key
    /// current there at once.
    pub async fn enrol(kleidi: &Path, tpms: &[TpmAccess]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("kleidi-tpm-admin-").tempdir()?;
        let admin = dir.path().join("admin");
        kleidi_tpm(kleidi, None, &["admin-key", "--out", &path_str(&admin)?]).await?;
        let (first, others) = tpms.split_first().context("no TPM to enrol")?;
        let key_id = init_shareable(kleidi, first, &first.state_dir, dir.path()).await?;
        let kek = SharedKek {
            dir,
            key_id,
            rotations: 0,
        };
        for (i, tpm) in others.iter().enumerate() {
            let node = i + 1;
            let parent = kek.file(node, "parent");
            let name = kleidi_tpm(
                kleidi,
                Some((tpm, &tpm.state_dir)),
                &["export-parent", "--out", &path_str(&parent)?],
            )
            .await?;
            let approval = kek.file(node, "approval");
            let approved = kleidi_tpm(
                kleidi,
                None,
                &[
                    "approve",
                    "--admin-key",
                    &path_str(&admin)?,
                    "--to",
                    &path_str(&parent)?,
                    "--out",
                    &path_str(&approval)?,
                ],
            )
            .await?;
            // The operator's check against a swapped parent file.
            if approved != name {
                bail!("node {node}: export-parent printed {name}, approve printed {approved}");
            }
            kek.share(kleidi, first, &first.state_dir, node, tpm, &tpm.state_dir)
                .await?;
        }
        Ok(kek)
    }

    /// The shared key_id (the current key on every enrolled TPM).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Where the admin key (`admin`, `admin.pub`) and the per-node files are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Rotates: a new shareable KEK on node 0, exported to every other node with the approvals of
    /// the enrolment. The README's order (init, then export/import) leaves a window in which node 0
    /// wraps with a key the others cannot unwrap yet; so every node's copy is made in a scratch
    /// state directory first, its blob put beside the node's keys, and only then each node's
    /// `current` switched (an atomic rename, as kleidi writes it). Serving plugins pick the new key
    /// up by themselves (Status re-reads `current`; Decrypt re-reads the directory for an unknown
    /// key). Returns the new key_id.
    pub async fn rotate(&mut self, kleidi: &Path, tpms: &[TpmAccess]) -> Result<String> {
        self.rotations += 1;
        let stage = self.dir.path().join(format!("rotation-{}", self.rotations));
        let staged = |node: usize| stage.join(format!("node-{node}"));
        let (first, others) = tpms.split_first().context("no TPM to rotate")?;
        let key_id = init_shareable(kleidi, first, &staged(0), self.dir.path()).await?;
        for (i, tpm) in others.iter().enumerate() {
            let node = i + 1;
            self.share(kleidi, first, &staged(0), node, tpm, &staged(node))
                .await?;
        }
        for (node, tpm) in tpms.iter().enumerate() {
            install_keys(&staged(node), &tpm.state_dir)?;
        }
        for (node, tpm) in tpms.iter().enumerate() {
            copy_atomically(&staged(node).join("current"), &tpm.state_dir.join("current"))?;
        }
        self.key_id = key_id.clone();
        Ok(key_id)
    }

    fn file(&self, node: usize, what: &str) -> PathBuf {
        self.dir.path().join(format!("node-{node}.{what}"))
    }

    /// `export` on node 0 (from `from_state`) to node `node`'s approved parent, `import` there (into
    /// `to_state`); both print the key_id, and it must be node 0's current one.
    async fn share(
        &self,
        kleidi: &Path,
        from: &TpmAccess,
        from_state: &Path,
        node: usize,
        to: &TpmAccess,
        to_state: &Path,
    ) -> Result<()> {
        let exported = self.file(node, &format!("kek-{}", self.rotations));
        let exported_id = kleidi_tpm(
            kleidi,
            Some((from, from_state)),
            &[
                "export",
                "--to",
                &path_str(&self.file(node, "parent"))?,
                "--approval",
                &path_str(&self.file(node, "approval"))?,
                "--out",
                &path_str(&exported)?,
            ],
        )
        .await?;
        let imported_id =
            kleidi_tpm(kleidi, Some((to, to_state)), &["import", &path_str(&exported)?]).await?;
        let expected = std::fs::read_to_string(from_state.join("current"))?;
        let expected = expected.trim();
        if exported_id != expected || imported_id != expected {
            bail!(
                "node {node}: exported {exported_id}, imported {imported_id}, node 0's current key is {expected}"
            );
        }
        Ok(())
    }
}

/// `kleidi tpm init --shareable` on `tpm` into `state`, its policy naming `admin_dir`/admin.pub.
async fn init_shareable(kleidi: &Path, tpm: &TpmAccess, state: &Path, admin_dir: &Path) -> Result<String> {
    kleidi_tpm(
        kleidi,
        Some((tpm, state)),
        &[
            "init",
            "--shareable",
            "--admin-pub",
            &path_str(&admin_dir.join("admin.pub"))?,
        ],
    )
    .await
}

/// Copies every KEK blob (`*.kek`) of `from` into `to`, each by an atomic rename, leaving `current`.
fn install_keys(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "kek") {
            let name = path.file_name().context("a blob without a file name")?;
            copy_atomically(&path, &to.join(name))?;
        }
    }
    Ok(())
}

/// Copies `from` to `to` through a dot-file beside `to` and a rename: a plugin reading the state
/// directory sees the old file or the new one, never half of one.
fn copy_atomically(from: &Path, to: &Path) -> Result<()> {
    let name = to.file_name().context("no file name")?.to_string_lossy();
    let tmp = to.with_file_name(format!(".{name}.harness-tmp"));
    std::fs::copy(from, &tmp).with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    Ok(())
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Runs `kleidi tpm ARGS` (with `--tpm-tcti` and `--tpm-state-dir` for a TPM command) and returns
/// what it printed: a key_id or a Name, never key material.
async fn kleidi_tpm(kleidi: &Path, tpm: Option<(&TpmAccess, &Path)>, args: &[&str]) -> Result<String> {
    let mut cmd = tokio::process::Command::new(kleidi);
    cmd.arg("tpm")
        .args(args)
        .env("TSS2_LOG", "all+none")
        .kill_on_drop(true);
    if let Some((tpm, state)) = tpm {
        cmd.args(["--tpm-tcti", &tpm.tcti, "--tpm-state-dir"]).arg(state);
    }
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running {}", kleidi.display()))?;
    let verb = args.first().copied().unwrap_or_default();
    if !out.status.success() {
        bail!(
            "kleidi tpm {verb} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A free port P with P + 1 free too, outside the ephemeral range (see [`super::free_port`]).
/// Bounded: 100 tries.
fn free_port_pair() -> Result<u16> {
    for _ in 0..100 {
        let port = super::free_port()?;
        let first = std::net::TcpListener::bind(("127.0.0.1", port));
        if first.is_ok() && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no two adjacent free ports on 127.0.0.1 in 100 tries")
}
