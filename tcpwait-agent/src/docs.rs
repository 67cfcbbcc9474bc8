//! Shell completions and manual pages, generated from the same clap definitions as the
//! command line itself (`clap_complete`, `clap_mangen`), so they cannot drift from the flags.
//! The examples of `tcpwait --help` are data here, rendered both into the help text and into
//! the man page's EXAMPLES section.
use std::{io::Write, path::Path};

use clap::CommandFactory as _;
use roff::{Roff, bold, roman};

use crate::cli::Cli;

/// The common tasks, as (what, command line): shown by `tcpwait --help` and `man tcpwait`.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "Start the agent (as root), with the embedded defaults or /etc/tcpwait/tcpwait.toml:",
        "tcpwait run",
    ),
    (
        "Find a leak: which processes hold CLOSE_WAIT sockets, how many, since when:",
        "tcpwait status",
    ),
    (
        "Tail the transitions of one port, with the processes holding the sockets:",
        "tcpwait tail --port 8080",
    ),
    (
        "Without an agent: print every transition into or out of CLOSE_WAIT:",
        "tcpwait trace --state close_wait",
    ),
    (
        "Check a configuration file before installing it:",
        "tcpwait config --check /etc/tcpwait/tcpwait.toml",
    ),
    (
        "Install the bash completions and the manual pages:",
        "tcpwait completions bash > /etc/bash_completion.d/tcpwait; tcpwait man --dir /usr/local/share/man/man1",
    ),
];

/// The examples as `--help` shows them (the `after_help` of the top-level command).
pub fn examples_help() -> String {
    let mut text = String::from("Examples:\n");
    for (what, cmd) in EXAMPLES {
        text.push_str(&format!("  {what}\n      {cmd}\n"));
    }
    text
}

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "tcpwait", out);
}

/// Writes the `tcpwait(1)` page: clap_mangen's sections, with EXAMPLES in place of its
/// unformatted EXTRA section (one example per tagged paragraph, the command in bold).
pub fn man_page(out: &mut dyn Write) -> std::io::Result<()> {
    top_page(man_command(), out)
}

/// The command as the pages describe it: built, without clap's `help` subcommand.
fn man_command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

fn top_page(cmd: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd);
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;
    let mut roff = Roff::new();
    roff.control("SH", ["EXAMPLES"]);
    for (what, line) in EXAMPLES {
        roff.control("TP", [])
            .text([roman(*what)])
            .text([bold(*line)]);
    }
    roff.to_writer(out)?;
    man.render_version_section(out)
}

/// Writes `tcpwait.1` and one `tcpwait-<command>.1` per command into `dir`; returns the
/// files written.
pub fn man_pages_to(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let cmd = man_command();
    let mut written = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.push(clap_mangen::Man::new(sub.clone()).generate_to(dir)?);
    }
    let top = dir.join("tcpwait.1");
    let mut file = std::fs::File::create(&top)?;
    top_page(cmd, &mut file)?;
    file.flush()?;
    written.insert(0, top);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_shows_every_example() {
        let help = Cli::command().render_long_help().to_string();
        for (what, cmd) in EXAMPLES {
            assert!(help.contains(what) && help.contains(cmd), "{what}\n{help}");
        }
        for task in [
            "tcpwait status",
            "tcpwait tail --port",
            "tcpwait config --check",
        ] {
            assert!(help.contains(task), "{task}");
        }
    }

    #[test]
    fn man_page_has_the_commands_and_examples() {
        let mut page = Vec::new();
        man_page(&mut page).expect("render");
        let page = String::from_utf8(page).expect("UTF-8");
        assert!(page.starts_with(".ie \\n(.g .ds Aq"), "{page}");
        for needle in [
            ".TH tcpwait 1",
            ".SH EXAMPLES",
            "\\fBtcpwait status\\fR",
            "tcpwait\\-run(1)",
        ] {
            assert!(page.contains(needle), "{needle} missing:\n{page}");
        }
        assert!(!page.contains(".SH EXTRA"), "examples are rendered once");
    }

    #[test]
    fn completions_name_every_command() {
        let mut script = Vec::new();
        completions(clap_complete::Shell::Bash, &mut script);
        let script = String::from_utf8(script).expect("UTF-8");
        for sub in [
            "trace",
            "run",
            "status",
            "config",
            "tail",
            "completions",
            "man",
        ] {
            assert!(script.contains(sub), "{sub}");
        }
        assert!(script.contains("complete -F _tcpwait"), "{script}");
    }
}
