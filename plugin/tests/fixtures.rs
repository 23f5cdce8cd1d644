//! The manifests in `fixtures/kubernetes/` are what a user copies onto a control-plane node: their
//! kleidi command lines must parse with today's flags, and the socket, config and token paths must
//! agree between kleidi's pod, kube-apiserver's patch and the EncryptionConfiguration.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

use clap::Parser;
use kleidi::config::{Cli, Command, Pkcs11Command};
use kleidi::server::Endpoint;

fn fixture(name: &str) -> String {
    let path = format!("{}/../fixtures/kubernetes/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `command:` list that starts with `- kleidi`, as argv.
fn kleidi_commands(manifest: &str) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in manifest.lines() {
        let item = line.trim().strip_prefix("- ").map(str::trim);
        match (&mut current, item) {
            (Some(argv), Some(arg)) => argv.push(arg.to_owned()),
            (Some(_), None) => commands.extend(current.take()),
            (None, Some("kleidi")) => current = Some(vec!["kleidi".to_owned()]),
            (None, _) => {}
        }
    }
    commands.extend(current);
    commands
}

/// `hostPath: { path: P, … }` values.
fn host_paths(manifest: &str) -> Vec<String> {
    manifest
        .lines()
        .filter_map(|l| l.split("hostPath: { path: ").nth(1))
        .map(|rest| rest.split(',').next().unwrap().trim().to_owned())
        .collect()
}

#[test]
fn static_pod_commands_parse_with_the_current_flags() {
    let commands = kleidi_commands(&fixture("kleidi-static-pod.yaml"));
    assert_eq!(commands.len(), 2, "expected pkcs11 init and serve: {commands:?}");
    let init = Cli::try_parse_from(&commands[0]).unwrap_or_else(|e| panic!("{:?}: {e}", commands[0]));
    assert!(matches!(
        init.command,
        Command::Pkcs11(Pkcs11Command::Init { .. })
    ));
    let serve = Cli::try_parse_from(&commands[1]).unwrap_or_else(|e| panic!("{:?}: {e}", commands[1]));
    let Command::Serve(serve) = serve.command else {
        panic!("second command is not serve")
    };
    let Command::Pkcs11(Pkcs11Command::Init { pkcs11, .. }) = init.command else {
        unreachable!()
    };
    // The init container makes exactly the token and key the server then uses.
    assert_eq!(pkcs11.pkcs11_token_label, serve.pkcs11.pkcs11_token_label);
    assert_eq!(pkcs11.pkcs11_key_label, serve.pkcs11.pkcs11_key_label);
    assert_eq!(pkcs11.pkcs11_pin_file, serve.pkcs11.pkcs11_pin_file);
}

#[test]
fn socket_and_paths_agree_across_the_three_manifests() {
    let pod = fixture("kleidi-static-pod.yaml");
    let patch = fixture("kube-apiserver-patch.yaml");
    let config = fixture("encryption-config.yaml");
    let serve = kleidi_commands(&pod).pop().unwrap();
    let Command::Serve(serve) = Cli::try_parse_from(&serve).unwrap().command else {
        panic!()
    };
    let Endpoint::Path(socket) = &serve.listen else {
        panic!("abstract socket in the pod")
    };

    // The apiserver dials what kleidi listens on.
    let endpoint = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("endpoint: "))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert_eq!(endpoint.parse::<Endpoint>().unwrap(), serve.listen);
    assert!(config.contains("apiVersion: v2"), "the provider must say KMS v2");
    // Both pods mount the socket's host directory.
    let dir = socket.parent().unwrap().to_str().unwrap().to_owned();
    assert!(host_paths(&pod).contains(&dir), "kleidi pod does not mount {dir}");
    assert!(
        host_paths(&patch).contains(&dir),
        "kube-apiserver patch does not mount {dir}"
    );
    // kube-apiserver reads the EncryptionConfiguration from a directory the patch mounts.
    let flag = patch
        .lines()
        .find_map(|l| l.trim().strip_prefix("- --encryption-provider-config="))
        .unwrap();
    let enc_dir = std::path::Path::new(flag)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(host_paths(&patch).contains(&enc_dir), "{enc_dir} is not mounted");
    // The PIN file lives in the config directory the pod mounts.
    let pin = serve.pkcs11.pkcs11_pin_file.unwrap();
    assert!(host_paths(&pod).contains(&pin.parent().unwrap().to_str().unwrap().to_owned()));
}

#[test]
fn the_readme_check_example_parses_with_the_current_flags() {
    let path = format!("{}/../README.md", env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(&path).unwrap();
    let mut lines = readme.lines().skip_while(|l| !l.starts_with("$ kleidi check "));
    let mut command = String::new();
    for line in lines.by_ref() {
        let (text, continued) = match line.strip_suffix('\\') {
            Some(text) => (text, true),
            None => (line, false),
        };
        command.push_str(text);
        if !continued {
            break;
        }
    }
    let argv: Vec<&str> = command.trim_start_matches("$ ").split_whitespace().collect();
    assert!(argv.len() > 2, "no `$ kleidi check` example in README.md");
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let Command::Check(check) = cli.command else {
        panic!("not check: {argv:?}")
    };
    // The example's socket is the one the manifests use.
    assert_eq!(check.serve.listen, Endpoint::Path("/run/kleidi/kms.sock".into()));
}
