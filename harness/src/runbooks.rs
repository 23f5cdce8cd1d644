//! `docs/runbooks.md` tells operators what to type at the worst moments (a rotation, a restore): every
//! `kleidi …` and `kleidi-harness …` command line in its `sh` blocks must parse with today's flags, so
//! the runbooks cannot rot. Parsing only: nothing runs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

use clap::Parser as _;

use super::Cli;

const RUNBOOKS: &str = include_str!("../../docs/runbooks.md");

/// The command lines of every ```sh block: continuation lines joined, comments dropped, split at
/// pipes, `&&`, `||` and `;`.
fn shell_commands(markdown: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut in_sh = false;
    let mut line = String::new();
    for raw in markdown.lines() {
        let text = raw.trim();
        if text.starts_with("```") {
            in_sh = !in_sh && text == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        // A comment starts at a `#` at the start of a line or after a blank.
        let code = match text.find(" #") {
            Some(at) => &text[..at],
            None if text.starts_with('#') => "",
            None => text,
        };
        match code.strip_suffix('\\') {
            Some(head) => line.push_str(head),
            None => {
                line.push_str(code);
                let joined = line.replace("&&", ";").replace("||", ";").replace('|', ";");
                commands.extend(
                    joined
                        .split(';')
                        .map(|c| c.trim().to_owned())
                        .filter(|c| !c.is_empty()),
                );
                line.clear();
            }
        }
    }
    commands
}

/// The argv of a `kleidi` / `kleidi-harness` command inside `command`: the binary by name or by a
/// path through a `bin/` directory (`/usr/local/bin/kleidi`, `target/release/kleidi`), not any path
/// that ends in `/kleidi` (`/run/kleidi`).
fn our_argv(command: &str) -> Option<(String, Vec<String>)> {
    let words: Vec<String> = command
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c| c == '"' || c == '\'')
                .trim_end_matches('&')
                .to_owned()
        })
        .filter(|w| !w.is_empty())
        .collect();
    let at = words.iter().position(|w| {
        let (dir, name) = w.rsplit_once('/').unwrap_or(("", w));
        (name == "kleidi" || name == "kleidi-harness")
            && (dir.is_empty() || dir.ends_with("bin") || dir.ends_with("release") || dir.ends_with("debug"))
    })?;
    let name = words[at].rsplit('/').next().unwrap_or(&words[at]).to_owned();
    // The shell's redirections (`> file`, `2>&1`) are not arguments.
    let argv = words[at..]
        .iter()
        .take_while(|w| !w.starts_with(['>', '<']) && !w.starts_with("2>"))
        .cloned()
        .collect();
    Some((name, argv))
}

/// Parses `argv` with the CLI of `name`: the error clap would print, if any.
fn parse(name: &str, argv: &[String]) -> Result<(), String> {
    match name {
        "kleidi" => kleidi::config::Cli::try_parse_from(argv).map(drop),
        _ => Cli::try_parse_from(argv).map(drop),
    }
    .map_err(|e| e.to_string())
}

#[test]
fn every_command_line_of_ours_in_the_runbooks_parses() {
    let ours: Vec<(String, Vec<String>)> = shell_commands(RUNBOOKS)
        .iter()
        .filter_map(|c| our_argv(c))
        .collect();
    let mut failures = Vec::new();
    for (name, argv) in &ours {
        if let Err(e) = parse(name, argv) {
            failures.push(format!("{}\n{e}", argv.join(" ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // The runbooks cover each operation: an extraction that found nothing would prove nothing.
    for subcommand in [
        "kleidi pkcs11 init",
        "kleidi serve",
        "kleidi tpm init",
        "kleidi tpm export",
        "kleidi tpm import",
        "kleidi-harness audit",
        "kleidi-harness get",
        "kleidi-harness put",
        "kleidi-harness conformance",
    ] {
        assert!(
            ours.iter()
                .any(|(_, argv)| argv.join(" ").starts_with(subcommand)),
            "no `{subcommand}` in docs/runbooks.md"
        );
    }
}

#[test]
fn the_extraction_sees_a_wrong_flag_in_a_continued_line() {
    let doc = "text `kleidi nope`\n```sh\nsudo /usr/local/bin/kleidi serve --backend vault \\\n    --no-such-flag x   # a comment\nkleidi-harness audit --prefix /registry/ > out 2>&1 | grep -F x && echo done\n```\n";
    let ours: Vec<_> = shell_commands(doc).iter().filter_map(|c| our_argv(c)).collect();
    assert_eq!(ours.len(), 2, "{ours:?}");
    assert_eq!(ours[0].0, "kleidi");
    assert_eq!(ours[0].1[..3], ["/usr/local/bin/kleidi", "serve", "--backend"]);
    assert_eq!(ours[1].1.last().map(String::as_str), Some("/registry/"));
    assert!(
        parse(&ours[0].0, &ours[0].1)
            .unwrap_err()
            .contains("--no-such-flag")
    );
    parse(&ours[1].0, &ours[1].1).unwrap();
}
