//! Checkers over processes and their logs. (f) The plugin never panicked and never exited unless a
//! harness verb ended it. (g) No secret of the run — written plaintexts, seeds, PINs, OpenBao tokens
//! and secret_ids — occurs in any log, raw or in the forms code tends to print bytes in: hex, Base64,
//! and Rust's `Debug` of a byte slice.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};

use super::{Check, Checker, Needles};
use crate::scenario::history::{Event, Role};

/// A process log as read after the run.
#[derive(Clone, Debug)]
pub struct Log {
    /// Which log (`kleidi-0.log`, …).
    pub name: String,
    /// Its bytes.
    pub contents: Vec<u8>,
}

/// The exit code of a Rust program whose main thread panicked.
const PANIC_EXIT_CODE: i32 = 101;

/// (f) Checks the history's plugin exits and scans the plugin logs for panics.
#[derive(Clone, Debug, Default)]
pub struct PluginNeverExited {
    /// The plugins' logs.
    pub logs: Vec<Log>,
}

impl Checker for PluginNeverExited {
    fn name(&self) -> &'static str {
        "plugin_never_exited"
    }

    fn check(&self, history: &[Event]) -> Check {
        let mut check = Check::new(self.name());
        let (mut exits, mut by_harness) = (0, 0);
        for event in history {
            let Event::Exit(exit) = event else { continue };
            if exit.role != Role::Plugin {
                continue;
            }
            exits += 1;
            if exit.code == Some(PANIC_EXIT_CODE) {
                check.violation(
                    format!("{} exited with code 101 (a panic)", exit.process),
                    Some(event),
                );
            } else if exit.by_harness {
                by_harness += 1;
            } else {
                let how = match (exit.code, exit.signal) {
                    (_, Some(signal)) => format!("killed by signal {signal}"),
                    (Some(code), None) => format!("exited with code {code}"),
                    (None, None) => "exited".to_owned(),
                };
                check.violation(format!("{} {how} on its own", exit.process), Some(event));
            }
        }
        let mut panics = 0;
        for log in &self.logs {
            for (number, line) in log.contents.split(|b| *b == b'\n').enumerate() {
                if line.windows(b"panicked at".len()).any(|w| w == b"panicked at") {
                    panics += 1;
                    let line = String::from_utf8_lossy(line);
                    check.violation(format!("{}:{}: {}", log.name, number + 1, line.trim()), None);
                }
            }
        }
        check.figure("plugin_exits", exits);
        check.figure("plugin_exits_by_harness", by_harness);
        check.figure("panics_in_logs", panics);
        check.figure("logs", self.logs.len());
        check
    }
}

/// A secret of the run, named so a finding says which one leaked without printing it.
#[derive(Clone, Debug)]
pub struct Secret {
    /// What it is: `plaintext of /registry/secrets/default/a`, `pin`, `openbao token`, ….
    pub label: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// (g) Checks that no secret occurs in any log.
#[derive(Clone, Debug, Default)]
pub struct NoSecretInLogs {
    /// Every log of the run.
    pub logs: Vec<Log>,
    /// Every secret of the run.
    pub secrets: Vec<Secret>,
}

impl NoSecretInLogs {
    /// Shorter secrets would match by chance (a 4-digit PIN in a timestamp); they make the check
    /// unknown, so scenarios use long PINs.
    pub const MIN_LEN: usize = 8;
}

impl Checker for NoSecretInLogs {
    fn name(&self) -> &'static str {
        "no_secret_in_logs"
    }

    fn check(&self, _history: &[Event]) -> Check {
        let mut check = Check::new(self.name());
        let forms: Vec<(usize, &'static str, Vec<u8>)> = self
            .secrets
            .iter()
            .enumerate()
            .filter(|(_, s)| s.bytes.len() >= Self::MIN_LEN)
            .flat_map(|(number, s)| {
                forms(&s.bytes)
                    .into_iter()
                    .map(move |(form, bytes)| (number, form, bytes))
            })
            .collect();
        let mut needles = Needles::new(Self::MIN_LEN);
        let ids: Vec<usize> = forms
            .iter()
            .filter_map(|(_, _, bytes)| needles.add(bytes))
            .collect();
        let too_short: Vec<&str> = self
            .secrets
            .iter()
            .filter(|s| s.bytes.len() < Self::MIN_LEN)
            .map(|s| s.label.as_str())
            .collect();
        if let Some(first) = too_short.first() {
            check.unknown(format!(
                "{} secrets shorter than {} bytes cannot be searched for (first: {first})",
                too_short.len(),
                Self::MIN_LEN
            ));
        }
        for log in &self.logs {
            for found in needles.found_in(&log.contents) {
                let Some((number, form, _)) =
                    ids.iter().position(|id| *id == found).and_then(|i| forms.get(i))
                else {
                    continue;
                };
                let label = self
                    .secrets
                    .get(*number)
                    .map(|s| s.label.as_str())
                    .unwrap_or_default();
                check.violation(format!("{}: holds {label} ({form})", log.name), None);
            }
        }
        check.figure("logs", self.logs.len());
        check.figure(
            "log_bytes",
            self.logs.iter().map(|l| l.contents.len()).sum::<usize>(),
        );
        check.figure("secrets", self.secrets.len());
        check.figure("secrets_too_short", too_short.len());
        check
    }
}

/// The ways a secret can appear in a log. Base64 drops padding and the last character that padding
/// shares with whatever follows, so the secret is found at the start of a longer encoded blob too.
fn forms(secret: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let base64 = |encoded: String| {
        let trimmed = encoded.trim_end_matches('=');
        let keep = if trimmed.len() < encoded.len() {
            trimmed.len() - 1
        } else {
            trimmed.len()
        };
        trimmed.as_bytes().get(..keep).unwrap_or_default().to_vec()
    };
    let debug_head: Vec<String> = secret
        .iter()
        .take(NoSecretInLogs::MIN_LEN)
        .map(u8::to_string)
        .collect();
    vec![
        ("raw", secret.to_vec()),
        ("hex", hex::encode(secret).into_bytes()),
        ("HEX", hex::encode_upper(secret).into_bytes()),
        ("base64", base64(STANDARD.encode(secret))),
        ("base64url", base64(URL_SAFE.encode(secret))),
        ("Debug bytes", format!("[{}", debug_head.join(", ")).into_bytes()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::checker::Verdict;
    use crate::scenario::history::ExitRecord;

    fn exit(code: Option<i32>, signal: Option<i32>, by_harness: bool, role: Role) -> Event {
        Event::Exit(ExitRecord {
            at_ms: 7,
            process: "kleidi-0".into(),
            role,
            code,
            signal,
            by_harness,
        })
    }

    fn log(text: &[u8]) -> Log {
        Log {
            name: "kleidi-0.log".into(),
            contents: text.to_vec(),
        }
    }

    const SEED: [u8; 32] = [
        0xc3, 0x11, 0xfe, 0x42, 0x00, 0x9a, 0x7b, 0x5e, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
        16, 17, 18, 19, 20, 21, 22, 23, 24,
    ];

    fn secrets() -> NoSecretInLogs {
        NoSecretInLogs {
            logs: vec![log(
                b"INFO serving on /run/kleidi/kms.sock key_id=pkcs11:kek:01\n",
            )],
            secrets: vec![
                Secret {
                    label: "pin".into(),
                    bytes: b"pin-8f3a29d1".to_vec(),
                },
                Secret {
                    label: "seed of node 0".into(),
                    bytes: SEED.to_vec(),
                },
            ],
        }
    }

    #[test]
    fn exits_the_harness_caused_are_valid() {
        let history = [
            exit(None, Some(9), true, Role::Plugin),
            exit(Some(0), None, true, Role::Plugin),
            exit(Some(1), None, false, Role::Etcd),
        ];
        let check = PluginNeverExited {
            logs: vec![log(b"INFO shutting down\n")],
        }
        .check(&history);
        assert_eq!(check.verdict, Verdict::Valid, "{check:?}");
        assert_eq!(check.figures["plugin_exits_by_harness"], 2);
    }

    #[test]
    fn a_plugin_exiting_on_its_own_or_with_a_panic_code_is_invalid() {
        for event in [
            exit(Some(1), None, false, Role::Plugin),
            exit(Some(101), None, true, Role::Plugin),
            exit(None, Some(6), false, Role::Plugin),
        ] {
            let check = PluginNeverExited::default().check(std::slice::from_ref(&event));
            assert_eq!(check.verdict, Verdict::Invalid, "{event:?}");
            assert_eq!(check.violations[0].event, Some(event));
        }
    }

    #[test]
    fn a_panic_in_a_plugin_log_is_invalid_and_names_the_line() {
        let logs = vec![log(
            b"INFO ok\nthread 'tokio-runtime-worker' panicked at plugin/src/grpc.rs:10:5:\n",
        )];
        let check = PluginNeverExited { logs }.check(&[]);
        assert_eq!(check.verdict, Verdict::Invalid);
        assert!(
            check.violations[0].what.starts_with("kleidi-0.log:2: thread"),
            "{check:?}"
        );
    }

    #[test]
    fn logs_without_secrets_are_valid() {
        let check = secrets().check(&[]);
        assert_eq!(check.verdict, Verdict::Valid, "{check:?}");
    }

    #[test]
    fn a_secret_in_any_form_in_a_log_is_invalid_and_names_the_secret_not_its_value() {
        let seed_in_b64 = format!(
            "wrapped={}",
            STANDARD.encode([SEED.as_slice(), b"more bytes after"].concat())
        );
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"auth with pin-8f3a29d1 ok".to_vec(), "pin (raw)"),
            (
                format!("seed {}", hex::encode(SEED)).into_bytes(),
                "seed of node 0 (hex)",
            ),
            (hex::encode_upper(SEED).into_bytes(), "seed of node 0 (HEX)"),
            (seed_in_b64.into_bytes(), "seed of node 0 (base64)"),
            (URL_SAFE.encode(SEED).into_bytes(), "seed of node 0 (base64url)"),
            (
                format!("{:?}", SEED.to_vec()).into_bytes(),
                "seed of node 0 (Debug bytes)",
            ),
        ];
        for (text, expected) in cases {
            let mut checker = secrets();
            checker.logs.push(log(&text));
            let check = checker.check(&[]);
            assert_eq!(check.verdict, Verdict::Invalid, "{expected}");
            assert_eq!(
                check.violations[0].what,
                format!("kleidi-0.log: holds {expected}")
            );
        }
    }

    #[test]
    fn a_secret_too_short_to_search_for_is_unknown() {
        let mut checker = secrets();
        checker.secrets.push(Secret {
            label: "pin".into(),
            bytes: b"1234".to_vec(),
        });
        let check = checker.check(&[]);
        assert_eq!(check.verdict, Verdict::Unknown);
    }
}
