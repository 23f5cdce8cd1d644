//! The manifests in `fixtures/kubernetes/` are what a user copies onto a control-plane node. Each
//! is parsed as YAML (every document of it): kleidi's command lines must parse with today's flags,
//! and the socket, config, credential and probe settings must agree between kleidi's pods (static
//! pod, DaemonSet), kube-apiserver's patch, the kind cluster and every EncryptionConfiguration.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use kleidi::config::{Cli, Command, Pkcs11Command, ServeArgs};
use kleidi::server::Endpoint;
use yaml_rust2::{Yaml, YamlLoader};

/// kleidi's pods: each runs `kleidi serve` beside kube-apiserver.
const PODS: [&str; 2] = ["kleidi-static-pod.yaml", "kleidi-daemonset.yaml"];
/// Every EncryptionConfiguration, the first the one a cluster ends with.
const CONFIGS: [&str; 3] = [
    "encryption-config.yaml",
    "encryption-config-from-aescbc.yaml",
    "encryption-config-from-kms-v1.yaml",
];

fn fixture(name: &str) -> String {
    let path = format!("{}/../fixtures/kubernetes/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every YAML document of a fixture.
fn documents(name: &str) -> Vec<Yaml> {
    let docs = YamlLoader::load_from_str(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(!docs.is_empty(), "{name} holds no YAML document");
    docs
}

fn string(yaml: &Yaml) -> &str {
    yaml.as_str().unwrap_or_else(|| panic!("not a string: {yaml:?}"))
}

fn list(yaml: &Yaml) -> &[Yaml] {
    yaml.as_vec().map_or(&[], Vec::as_slice)
}

/// The one Pod or DaemonSet among a fixture's documents.
fn workload(name: &str) -> Yaml {
    let mut pods = documents(name)
        .into_iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("Pod" | "DaemonSet")));
    let pod = pods
        .next()
        .unwrap_or_else(|| panic!("{name}: no Pod or DaemonSet"));
    assert!(pods.next().is_none(), "{name}: two workloads");
    pod
}

/// The pod spec of a Pod or of a workload's template.
fn pod_spec(doc: &Yaml) -> &Yaml {
    match string(&doc["kind"]) {
        "Pod" => &doc["spec"],
        "DaemonSet" | "Deployment" => &doc["spec"]["template"]["spec"],
        other => panic!("not a pod: {other}"),
    }
}

/// Init containers, then containers.
fn containers(spec: &Yaml) -> Vec<&Yaml> {
    list(&spec["initContainers"])
        .iter()
        .chain(list(&spec["containers"]))
        .collect()
}

/// `command` then `args`, when the container runs kleidi.
fn kleidi_argv(container: &Yaml) -> Option<Vec<String>> {
    let argv: Vec<String> = list(&container["command"])
        .iter()
        .chain(list(&container["args"]))
        .map(|a| string(a).to_owned())
        .collect();
    (argv.first().map(String::as_str) == Some("kleidi")).then_some(argv)
}

fn parse(argv: &[String]) -> Cli {
    Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

/// The one `kleidi serve` container of a pod spec, with its parsed flags.
fn serve(spec: &Yaml) -> (&Yaml, ServeArgs) {
    let mut serving = containers(spec).into_iter().filter_map(|c| {
        let Command::Serve(args) = parse(&kleidi_argv(c)?).command else {
            return None;
        };
        Some((c, *args))
    });
    let first = serving.next().expect("no `kleidi serve` container");
    assert!(serving.next().is_none(), "two `kleidi serve` containers");
    first
}

fn socket(args: &ServeArgs) -> &Path {
    match &args.listen {
        Endpoint::Path(path) => path,
        Endpoint::Abstract(name) => panic!("abstract socket @{name}: it cannot cross a mount"),
    }
}

/// The host path behind `inside` (a path in `container`): the deepest volumeMount holding it and
/// that volume's hostPath. None when no hostPath volume holds it.
fn host_path(spec: &Yaml, container: &Yaml, inside: &Path) -> Option<PathBuf> {
    let (mount, name) = list(&container["volumeMounts"])
        .iter()
        .map(|m| (Path::new(string(&m["mountPath"])), string(&m["name"])))
        .filter(|(mount, _)| inside.starts_with(mount))
        .max_by_key(|(mount, _)| mount.components().count())?;
    let volume = list(&spec["volumes"])
        .iter()
        .find(|v| string(&v["name"]) == name)?;
    let base = PathBuf::from(volume["hostPath"]["path"].as_str()?);
    Some(base.join(inside.strip_prefix(mount).unwrap()))
}

/// Whether the mount holding `inside` is read-only.
fn read_only(container: &Yaml, inside: &Path) -> bool {
    list(&container["volumeMounts"])
        .iter()
        .filter(|m| inside.starts_with(string(&m["mountPath"])))
        .max_by_key(|m| string(&m["mountPath"]).len())
        .is_some_and(|m| m["readOnly"].as_bool() == Some(true))
}

/// The providers of the first resource list of an EncryptionConfiguration.
fn providers(config: &str) -> Vec<Yaml> {
    let doc = &documents(config)[0];
    assert_eq!(string(&doc["kind"]), "EncryptionConfiguration", "{config}");
    let resources = &list(&doc["resources"])[0];
    let names: Vec<&str> = list(&resources["resources"]).iter().map(string).collect();
    assert!(
        names.contains(&"secrets"),
        "{config} does not encrypt secrets: {names:?}"
    );
    list(&resources["providers"]).to_vec()
}

/// The endpoint kube-apiserver dials for kleidi, checking the provider is kms v2 and first.
fn kleidi_endpoint(config: &str) -> Endpoint {
    let providers = providers(config);
    let kms = &providers[0]["kms"];
    assert!(
        !kms.is_badvalue(),
        "{config}: the first provider (the one that writes) is not kms"
    );
    // An empty apiVersion means v1 to kube-apiserver.
    assert_eq!(
        kms["apiVersion"].as_str(),
        Some("v2"),
        "{config}: kleidi's provider must say v2"
    );
    let name = string(&kms["name"]);
    assert_eq!(name, "kleidi", "{config}");
    string(&kms["endpoint"]).parse().unwrap()
}

#[test]
fn every_kleidi_command_line_in_the_pods_parses_with_the_current_flags() {
    for pod in PODS {
        let doc = workload(pod);
        let spec = pod_spec(&doc);
        for container in containers(spec) {
            let name = string(&container["name"]);
            // Every container of the kleidi images runs kleidi itself: the images have no shell.
            if string(&container["image"]).starts_with("kleidi:") {
                let argv = kleidi_argv(container).unwrap_or_else(|| panic!("{pod} {name}: not `kleidi …`"));
                parse(&argv);
            }
        }
        serve(spec);
    }
}

#[test]
fn the_static_pods_init_container_makes_the_token_and_key_the_server_uses() {
    let doc = workload("kleidi-static-pod.yaml");
    let spec = pod_spec(&doc);
    let init = list(&spec["initContainers"])
        .iter()
        .find_map(kleidi_argv)
        .unwrap();
    let Command::Pkcs11(Pkcs11Command::Init { pkcs11, .. }) = parse(&init).command else {
        panic!("{init:?} is not `kleidi pkcs11 init`")
    };
    let (_, serve) = serve(spec);
    assert_eq!(pkcs11.pkcs11_module, serve.pkcs11.pkcs11_module);
    assert_eq!(pkcs11.pkcs11_token_label, serve.pkcs11.pkcs11_token_label);
    assert_eq!(pkcs11.pkcs11_key_label, serve.pkcs11.pkcs11_key_label);
    assert_eq!(pkcs11.pkcs11_pin_file, serve.pkcs11.pkcs11_pin_file);
    // The SoftHSM module is only in the -softhsm image.
    for container in containers(spec) {
        assert!(string(&container["image"]).ends_with("-softhsm"), "{container:?}");
    }
}

#[test]
fn the_socket_is_one_host_path_for_every_pod_the_apiserver_and_every_config() {
    let patch = &documents("kube-apiserver-patch.yaml")[0];
    let apiserver = list(&patch["spec"]["containers"])
        .iter()
        .find(|c| string(&c["name"]) == "kube-apiserver")
        .unwrap();
    for config in CONFIGS {
        let Endpoint::Path(endpoint) = kleidi_endpoint(config) else {
            panic!("{config}: abstract socket")
        };
        // The apiserver's view of the socket is on the host at …
        let on_host = host_path(&patch["spec"], apiserver, &endpoint)
            .unwrap_or_else(|| panic!("kube-apiserver-patch.yaml does not mount {}", endpoint.display()));
        for pod in PODS {
            let doc = workload(pod);
            let spec = pod_spec(&doc);
            let (container, args) = serve(spec);
            // … where each kleidi pod puts the socket it listens on.
            let socket = socket(&args);
            assert_eq!(
                host_path(spec, container, socket),
                Some(on_host.clone()),
                "{pod} vs {config}"
            );
        }
    }
}

#[test]
fn the_apiserver_patch_mounts_the_directory_of_its_encryption_config() {
    let patch = &documents("kube-apiserver-patch.yaml")[0];
    let apiserver = &list(&patch["spec"]["containers"])[0];
    let flag = list(&apiserver["command"])
        .iter()
        .find_map(|a| string(a).strip_prefix("--encryption-provider-config="))
        .unwrap();
    assert!(
        host_path(&patch["spec"], apiserver, Path::new(flag)).is_some(),
        "{flag} is not mounted"
    );
    assert!(
        read_only(apiserver, Path::new(flag)),
        "{flag} is mounted writable"
    );
}

#[test]
fn credential_files_are_read_from_a_read_only_host_directory() {
    for pod in PODS {
        let doc = workload(pod);
        let spec = pod_spec(&doc);
        let (container, args) = serve(spec);
        let files: Vec<&PathBuf> = [
            &args.pkcs11.pkcs11_pin_file,
            &args.vault.vault_token_file,
            &args.vault.vault_role_id_file,
            &args.vault.vault_secret_id_file,
            &args.vault.vault_ca_file,
        ]
        .into_iter()
        .flatten()
        .collect();
        assert!(!files.is_empty(), "{pod}: no credential file");
        for file in files {
            assert!(
                host_path(spec, container, file).is_some(),
                "{pod}: {} is not mounted",
                file.display()
            );
            assert!(
                read_only(container, file),
                "{pod}: {} is mounted writable",
                file.display()
            );
        }
    }
}

#[test]
fn the_probes_ask_the_metrics_address_kleidi_serves() {
    for pod in PODS {
        let doc = workload(pod);
        let spec = pod_spec(&doc);
        let (container, args) = serve(spec);
        let addr: SocketAddr = args
            .metrics_addr
            .unwrap_or_else(|| panic!("{pod}: no --metrics-addr"));
        // kubelet probes from the node: a loopback listener needs the node's network namespace.
        assert!(
            addr.ip().is_loopback(),
            "{pod}: {addr} (the endpoints have no authentication)"
        );
        assert_eq!(
            spec["hostNetwork"].as_bool(),
            Some(true),
            "{pod}: loopback probes need hostNetwork"
        );
        for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{pod} {probe}");
            assert_eq!(
                get["port"].as_i64(),
                Some(i64::from(addr.port())),
                "{pod} {probe}"
            );
            assert_eq!(
                get["host"].as_str(),
                Some(addr.ip().to_string().as_str()),
                "{pod} {probe}"
            );
        }
        // A backend outage fails readiness long before liveness would restart the process.
        let failures = |probe: &str| {
            let p = &container[probe];
            p["periodSeconds"].as_i64().unwrap() * p["failureThreshold"].as_i64().unwrap()
        };
        assert!(failures("livenessProbe") > failures("readinessProbe"), "{pod}");
    }
}

#[test]
fn kleidis_pods_run_as_non_root_read_only_with_no_capability() {
    for pod in PODS {
        let doc = workload(pod);
        let spec = pod_spec(&doc);
        assert_eq!(
            spec["priorityClassName"].as_str(),
            Some("system-node-critical"),
            "{pod}"
        );
        let user = &spec["securityContext"];
        assert_eq!(user["runAsNonRoot"].as_bool(), Some(true), "{pod}");
        assert!(
            user["runAsUser"].as_i64().is_some_and(|u| u > 0),
            "{pod}: runAsUser"
        );
        for container in containers(spec) {
            let security = &container["securityContext"];
            assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true), "{pod}");
            assert_eq!(
                security["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{pod}"
            );
            let drop: Vec<&str> = list(&security["capabilities"]["drop"])
                .iter()
                .map(string)
                .collect();
            assert_eq!(drop, ["ALL"], "{pod}");
        }
        let (container, _) = serve(spec);
        assert!(
            !container["resources"]["limits"]["memory"].is_badvalue(),
            "{pod}: no memory limit"
        );
    }
}

#[test]
fn the_daemonset_needs_nothing_the_apiserver_decrypts_and_runs_on_control_plane_nodes() {
    let doc = &documents("kleidi-daemonset.yaml")[0];
    assert_eq!(string(&doc["kind"]), "DaemonSet");
    let spec = pod_spec(doc);
    // Secrets and ConfigMaps are decrypted through kleidi: its own pod may use neither, nor the
    // ServiceAccount token (its projected volume carries a ConfigMap).
    assert_eq!(spec["automountServiceAccountToken"].as_bool(), Some(false));
    for volume in list(&spec["volumes"]) {
        assert!(
            !volume["hostPath"].is_badvalue(),
            "not a hostPath volume: {volume:?}"
        );
    }
    for container in containers(spec) {
        assert!(container["envFrom"].is_badvalue(), "envFrom in {container:?}");
        for env in list(&container["env"]) {
            assert!(env["valueFrom"].is_badvalue(), "env from the API in {env:?}");
        }
    }
    // Cluster DNS needs the API server: resolve as the node does.
    assert_eq!(spec["dnsPolicy"].as_str(), Some("Default"));
    let control_plane = "node-role.kubernetes.io/control-plane";
    assert!(
        !spec["nodeSelector"][control_plane].is_badvalue(),
        "no control-plane nodeSelector"
    );
    let tolerated = list(&spec["tolerations"]).iter().any(|t| {
        t["key"].as_str() == Some(control_plane)
            && t["operator"].as_str() == Some("Exists")
            && t["effect"].as_str().is_none_or(|e| e == "NoSchedule")
    });
    assert!(tolerated, "the control-plane taint is not tolerated");
}

#[test]
fn every_encryption_config_writes_with_kleidi_and_still_reads_the_old_provider() {
    // (config, the provider the old data was written with, which must follow kleidi)
    let old = [
        ("encryption-config.yaml", "identity"),
        ("encryption-config-from-aescbc.yaml", "aescbc"),
        ("encryption-config-from-kms-v1.yaml", "kms"),
    ];
    assert_eq!(old.map(|(c, _)| c), CONFIGS);
    for (config, provider) in old {
        kleidi_endpoint(config);
        let providers = providers(config);
        let rest = &providers[1..];
        let found = rest.iter().find(|p| !p[provider].is_badvalue());
        let found = found.unwrap_or_else(|| panic!("{config}: no {provider} provider after kleidi"));
        match provider {
            "aescbc" => assert!(!list(&found["aescbc"]["keys"]).is_empty(), "{config}: no key"),
            "kms" => {
                let v1 = &found["kms"];
                assert_eq!(v1["apiVersion"].as_str(), Some("v1"), "{config}");
                // kube-apiserver refuses two kms providers of one name.
                assert_ne!(v1["name"].as_str(), Some("kleidi"), "{config}");
                assert_ne!(
                    string(&v1["endpoint"]).parse::<Endpoint>().unwrap(),
                    kleidi_endpoint(config)
                );
            }
            _ => {}
        }
    }
}

#[test]
fn the_kind_cluster_mounts_the_config_and_the_socket_into_the_apiserver() {
    let doc = &documents("kind-cluster.yaml")[0];
    assert_eq!(string(&doc["kind"]), "Cluster");
    assert_eq!(string(&doc["apiVersion"]), "kind.x-k8s.io/v1alpha4");
    let node = list(&doc["nodes"])
        .iter()
        .find(|n| string(&n["role"]) == "control-plane")
        .unwrap();
    let kubeadm = list(&node["kubeadmConfigPatches"])
        .iter()
        .flat_map(|p| YamlLoader::load_from_str(string(p)).unwrap())
        .find(|p| p["kind"].as_str() == Some("ClusterConfiguration"))
        .expect("no ClusterConfiguration patch");
    let api = &kubeadm["apiServer"];
    // The path of a file inside the apiserver → the node → the kind host, through both mounts.
    let to_host = |inside: &Path| -> PathBuf {
        let volume = list(&api["extraVolumes"])
            .iter()
            .filter(|v| inside.starts_with(string(&v["mountPath"])))
            .max_by_key(|v| string(&v["mountPath"]).len())
            .unwrap_or_else(|| panic!("the apiserver does not mount {}", inside.display()));
        let on_node = Path::new(string(&volume["hostPath"]))
            .join(inside.strip_prefix(string(&volume["mountPath"])).unwrap());
        let mount = list(&node["extraMounts"])
            .iter()
            .find(|m| on_node.starts_with(string(&m["containerPath"])))
            .unwrap_or_else(|| panic!("the kind node does not mount {}", on_node.display()));
        Path::new(string(&mount["hostPath"]))
            .join(on_node.strip_prefix(string(&mount["containerPath"])).unwrap())
    };
    // extraArgs: a map (kubeadm v1beta3) or a list of name/value (v1beta4).
    let args = &api["extraArgs"];
    let flag = args["encryption-provider-config"].as_str().or_else(|| {
        list(args)
            .iter()
            .find(|a| a["name"].as_str() == Some("encryption-provider-config"))
            .and_then(|a| a["value"].as_str())
    });
    let config = Path::new(flag.expect("no --encryption-provider-config"));
    // The file the comment copies there is the repository's encryption-config.yaml.
    let name = config.file_name().unwrap().to_str().unwrap();
    let on_host = to_host(config);
    let comment = fixture("kind-cluster.yaml");
    let copy = format!(
        "cp fixtures/kubernetes/{name} {}/",
        on_host.parent().unwrap().display()
    );
    assert!(comment.contains(&copy), "kind-cluster.yaml does not say `{copy}`");
    // kleidi on the host listens where the apiserver dials through both mounts.
    let Endpoint::Path(endpoint) = kleidi_endpoint(name) else {
        panic!()
    };
    let listen = comment
        .lines()
        .find_map(|l| l.split("kleidi serve --listen ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("no `kleidi serve --listen …` in kind-cluster.yaml");
    assert_eq!(
        listen.parse::<Endpoint>().unwrap(),
        Endpoint::Path(to_host(&endpoint))
    );
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
