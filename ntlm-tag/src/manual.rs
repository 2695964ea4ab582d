//! The manual pages. ntlm-tag(8) is generated from the command-line definitions (clap_mangen: name,
//! synopsis, options, subcommands) around hand-written sections (description, files, signals, exit
//! status, environment); ntlm-tag.toml(5) is hand-written. Both are compiled in, so `ntlm-tag man`
//! serves an installation without the package, and the package installs what this prints.
#![forbid(unsafe_code)]

use std::io::{self, Write};

use clap::CommandFactory;

use crate::cli::{Cli, ManPage};

/// DESCRIPTION of ntlm-tag(8) (roff, placed after SYNOPSIS).
const COMMAND_DESCRIPTION: &str = include_str!("../man/ntlm-tag.8.description");
/// FILES, SIGNALS, EXIT STATUS, ENVIRONMENT and SEE ALSO of ntlm-tag(8) (roff, placed last).
const COMMAND_REFERENCE: &str = include_str!("../man/ntlm-tag.8.reference");
/// ntlm-tag.toml(5), whole.
pub const CONFIG_PAGE: &str = include_str!("../man/ntlm-tag.toml.5");

/// Writes `page` as roff.
pub fn render(page: ManPage, out: &mut dyn Write) -> io::Result<()> {
    match page {
        ManPage::Command => render_command(out),
        ManPage::Config => out.write_all(CONFIG_PAGE.as_bytes()),
    }
}

fn render_command(out: &mut dyn Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(Cli::command())
        .section("8")
        .manual("System Administration");
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    out.write_all(COMMAND_DESCRIPTION.as_bytes())?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;
    out.write_all(COMMAND_REFERENCE.as_bytes())?;
    man.render_version_section(out)
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;
    use crate::app;

    fn page(page: ManPage) -> String {
        let mut out = Vec::new();
        render(page, &mut out).expect("rendered");
        String::from_utf8(out).expect("UTF-8")
    }

    /// `groff -ww` (all warnings) on `roff`: its warnings, or a panic when groff is missing
    /// (`cargo xtask setup` installs it).
    fn groff_warnings(roff: &str) -> String {
        use std::io::Write as _;
        let mut child = Command::new("groff")
            .args(["-ww", "-z", "-man", "-Tutf8"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("groff runs (install groff-base: `cargo xtask setup`)");
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(roff.as_bytes())
            .expect("groff reads the page");
        let out = child.wait_with_output().expect("groff finishes");
        assert!(out.status.success(), "groff failed: {:?}", out.status);
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    #[test]
    fn both_pages_render_without_warnings() {
        for p in [ManPage::Command, ManPage::Config] {
            let warnings = groff_warnings(&page(p));
            assert!(warnings.is_empty(), "{p:?}: {warnings}");
        }
    }

    /// The hand-written sections are there, with every exit status the code uses and every
    /// subcommand.
    #[test]
    fn the_command_page_has_its_reference_sections() {
        let text = page(ManPage::Command);
        for section in [
            ".SH NAME",
            ".SH SYNOPSIS",
            ".SH DESCRIPTION",
            ".SH OPTIONS",
            ".SH SUBCOMMANDS",
            ".SH FILES",
            ".SH SIGNALS",
            ".SH \"EXIT STATUS\"",
            ".SH ENVIRONMENT",
            ".SH \"SEE ALSO\"",
        ] {
            assert!(text.contains(section), "no {section}");
        }
        for code in [
            0,
            1,
            64,
            app::EXIT_EBPF_UNAVAILABLE,
            crate::ready_deadline::EXIT_NOT_READY,
            app::EXIT_PRIVILEGES,
        ] {
            assert!(
                text.contains(&format!(".TP\n.B {code}\n")),
                "exit status {code}"
            );
        }
        for sub in Cli::command().get_subcommands() {
            let name = sub.get_name();
            assert!(
                text.contains(&format!("ntlm\\-tag\\-{name}")),
                "subcommand {name}"
            );
        }
    }
}
