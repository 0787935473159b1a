//! Colour for people, plain text for pipes: ANSI colours only when stdout is a terminal and
//! `NO_COLOR` is not set (<https://no-color.org>).

use std::io::IsTerminal;

const RESET: &str = "\x1b[0m";

/// Whether to colour text, decided once per command.
#[derive(Debug, Clone, Copy)]
pub struct Palette {
    enabled: bool,
}

impl Palette {
    /// Colours when stdout is a terminal and `NO_COLOR` is unset or empty.
    pub fn for_stdout() -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self::new(std::io::stdout().is_terminal() && !no_color)
    }

    /// A palette that colours when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Self { enabled }
    }

    /// `text` in the colour of `status`: red and bold for unhealthy, magenta for unknown,
    /// yellow for degraded, green for healthy. The words carry the meaning; colour only helps.
    pub fn status(self, status: &str, text: &str) -> String {
        let code = match status {
            "healthy" => "32",
            "degraded" => "33",
            "unhealthy" => "1;31",
            _ => "35",
        };
        self.wrap(code, text)
    }

    /// `text` dimmed, for what matters less than the rest of the line.
    pub fn dim(self, text: &str) -> String {
        self.wrap("2", text)
    }

    /// `text` in bold, for headings.
    pub fn bold(self, text: &str) -> String {
        self.wrap("1", text)
    }

    fn wrap(self, code: &str, text: &str) -> String {
        if self.enabled && !text.is_empty() {
            format!("\x1b[{code}m{text}{RESET}")
        } else {
            text.to_owned()
        }
    }
}

/// `text` with every control character replaced by a space: error texts come partly from
/// Proxmox servers, and an escape sequence in one must not reach the terminal, nor a newline
/// break a table row or a watch line.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(
            printable("refused\x1b]0;owned\x07\nnext"),
            "refused ]0;owned  next"
        );
    }

    #[test]
    fn plain_text_has_no_escape_codes_and_colour_wraps_the_text() {
        let plain = Palette::new(false);
        assert_eq!(plain.status("unhealthy", "unhealthy"), "unhealthy");
        assert_eq!(plain.dim("3s ago"), "3s ago");
        let colour = Palette::new(true);
        assert_eq!(
            colour.status("degraded", "degraded"),
            "\x1b[33mdegraded\x1b[0m"
        );
        assert_eq!(colour.bold(""), "");
    }
}
