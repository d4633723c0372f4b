//! Keymaps: key strings ("ctrl-c", "shift-enter", "G") bound to [`Action`]s in three
//! sections — `global` (checked first), `input` (while typing) and `browse` (panes, vim's
//! normal mode). The built-in keymaps are config/keymap-default.toml and
//! config/keymap-vim.toml, embedded in the binary; `[ui.keys.SECTION]` in config.toml
//! overrides single keys.

use std::fmt;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use serde::Deserialize;

use super::action::Action;
use memlora::config::KeyOverrides;

pub const DEFAULT_KEYMAP: &str = include_str!("../../config/keymap-default.toml");
pub const VIM_KEYMAP: &str = include_str!("../../config/keymap-vim.toml");

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KeymapError {
    #[error("ui.keymap: unknown keymap '{0}' (known: default, vim)")]
    Unknown(String),
    #[error("keymap {keymap}: {message}")]
    File { keymap: String, message: String },
    /// `origin` names the file and table: "keymap vim [browse]", "config [ui.keys.input]".
    #[error("{origin} \"{key}\": {message}")]
    Binding { origin: String, key: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Global,
    Input,
    Browse,
}

impl Section {
    pub const ALL: [Section; 3] = [Section::Global, Section::Input, Section::Browse];

    pub fn name(self) -> &'static str {
        match self {
            Section::Global => "global",
            Section::Input => "input",
            Section::Browse => "browse",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A key with its modifiers, normalised so that a terminal's report and a key string
/// compare equal (a typed `G` may come with or without SHIFT; BackTab comes with SHIFT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpec {
    pub code: KeyCode,
    pub modifiers: KeyModifiers,
}

impl KeySpec {
    pub fn new(code: KeyCode, modifiers: KeyModifiers) -> Self {
        let mut modifiers = modifiers & (KeyModifiers::CONTROL | KeyModifiers::ALT | KeyModifiers::SHIFT);
        let mut code = code;
        match code {
            KeyCode::Char(c) => {
                if modifiers.contains(KeyModifiers::SHIFT) && c.is_ascii_lowercase() {
                    code = KeyCode::Char(c.to_ascii_uppercase());
                }
                modifiers.remove(KeyModifiers::SHIFT);
            }
            KeyCode::BackTab => modifiers.remove(KeyModifiers::SHIFT),
            _ => {}
        }
        KeySpec { code, modifiers }
    }

    pub fn from_event(event: &KeyEvent) -> Self {
        Self::new(event.code, event.modifiers)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut rest = text;
        let mut modifiers = KeyModifiers::NONE;
        loop {
            let lower = rest.to_ascii_lowercase();
            let (prefix, modifier) = if lower.starts_with("ctrl-") && rest.len() > 5 {
                ("ctrl-", KeyModifiers::CONTROL)
            } else if lower.starts_with("alt-") && rest.len() > 4 {
                ("alt-", KeyModifiers::ALT)
            } else if lower.starts_with("shift-") && rest.len() > 6 {
                ("shift-", KeyModifiers::SHIFT)
            } else {
                break;
            };
            modifiers |= modifier;
            rest = &rest[prefix.len()..];
        }
        let mut chars = rest.chars();
        let code = match (chars.next(), chars.next()) {
            (Some(c), None) => KeyCode::Char(c),
            (None, _) => return Err("empty key".into()),
            _ => match rest.to_ascii_lowercase().as_str() {
                "enter" | "return" => KeyCode::Enter,
                "esc" | "escape" => KeyCode::Esc,
                "tab" => KeyCode::Tab,
                "backtab" => KeyCode::BackTab,
                "backspace" => KeyCode::Backspace,
                "delete" | "del" => KeyCode::Delete,
                "insert" => KeyCode::Insert,
                "up" => KeyCode::Up,
                "down" => KeyCode::Down,
                "left" => KeyCode::Left,
                "right" => KeyCode::Right,
                "home" => KeyCode::Home,
                "end" => KeyCode::End,
                "pageup" => KeyCode::PageUp,
                "pagedown" => KeyCode::PageDown,
                "space" => KeyCode::Char(' '),
                name => match name.strip_prefix('f').and_then(|n| n.parse::<u8>().ok()) {
                    Some(n @ 1..=12) => KeyCode::F(n),
                    _ => return Err(format!("unknown key name '{rest}'")),
                },
            },
        };
        if code == KeyCode::Char(' ') && rest != "space" && rest != " " {
            return Err(format!("unknown key name '{rest}'"));
        }
        Ok(Self::new(code, modifiers))
    }
}

impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.modifiers.contains(KeyModifiers::CONTROL) {
            write!(f, "ctrl-")?;
        }
        if self.modifiers.contains(KeyModifiers::ALT) {
            write!(f, "alt-")?;
        }
        if self.modifiers.contains(KeyModifiers::SHIFT) {
            write!(f, "shift-")?;
        }
        match self.code {
            KeyCode::Char(' ') => write!(f, "space"),
            KeyCode::Char(c) => write!(f, "{c}"),
            KeyCode::Enter => write!(f, "enter"),
            KeyCode::Esc => write!(f, "esc"),
            KeyCode::Tab => write!(f, "tab"),
            KeyCode::BackTab => write!(f, "backtab"),
            KeyCode::Backspace => write!(f, "backspace"),
            KeyCode::Delete => write!(f, "delete"),
            KeyCode::Insert => write!(f, "insert"),
            KeyCode::Up => write!(f, "up"),
            KeyCode::Down => write!(f, "down"),
            KeyCode::Left => write!(f, "left"),
            KeyCode::Right => write!(f, "right"),
            KeyCode::Home => write!(f, "home"),
            KeyCode::End => write!(f, "end"),
            KeyCode::PageUp => write!(f, "pageup"),
            KeyCode::PageDown => write!(f, "pagedown"),
            KeyCode::F(n) => write!(f, "f{n}"),
            other => write!(f, "{other:?}"),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeymapFile {
    modal: bool,
    #[serde(default)]
    global: Entries,
    #[serde(default)]
    input: Entries,
    #[serde(default)]
    browse: Entries,
}

/// A table's entries in the file's order (hints show a keymap's first key for an action).
#[derive(Default)]
struct Entries(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of key = \"action\"")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, String>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

#[derive(Debug, Clone)]
pub struct Keymap {
    pub name: String,
    /// Vim-like: typing only in insert mode. Otherwise the chat pane types and the other
    /// panes browse.
    pub modal: bool,
    sections: [Vec<(KeySpec, Action)>; 3],
}

impl Keymap {
    /// The built-in keymap `name` with the user's overrides.
    pub fn load(name: &str, overrides: &KeyOverrides) -> Result<Keymap, KeymapError> {
        let text = match name {
            "default" => DEFAULT_KEYMAP,
            "vim" => VIM_KEYMAP,
            other => return Err(KeymapError::Unknown(other.to_owned())),
        };
        let mut keymap = Keymap::parse(name, text)?;
        let sections = [
            (Section::Global, &overrides.direct, "config [ui.keys]"),
            (Section::Global, &overrides.global, "config [ui.keys.global]"),
            (Section::Input, &overrides.input, "config [ui.keys.input]"),
            (Section::Browse, &overrides.browse, "config [ui.keys.browse]"),
        ];
        for (section, entries, origin) in sections {
            for (key, action) in entries {
                keymap.bind(section, key, action, origin)?;
            }
        }
        Ok(keymap)
    }

    pub fn parse(name: &str, text: &str) -> Result<Keymap, KeymapError> {
        let file: KeymapFile = toml::from_str(text).map_err(|e| KeymapError::File { keymap: name.to_owned(), message: e.to_string() })?;
        let mut keymap = Keymap { name: name.to_owned(), modal: file.modal, sections: Default::default() };
        for (section, entries) in [(Section::Global, &file.global), (Section::Input, &file.input), (Section::Browse, &file.browse)] {
            for (key, action) in &entries.0 {
                keymap.bind(section, key, action, &format!("keymap {name} [{}]", section.name()))?;
            }
        }
        Ok(keymap)
    }

    /// Binds (or with action "none", unbinds) `key` in `section`.
    fn bind(&mut self, section: Section, key: &str, action: &str, origin: &str) -> Result<(), KeymapError> {
        let error = |message: String| KeymapError::Binding { origin: origin.to_owned(), key: key.to_owned(), message };
        let spec = KeySpec::parse(key).map_err(error)?;
        let entries = &mut self.sections[section.index()];
        entries.retain(|(existing, _)| *existing != spec);
        if action != "none" {
            let action = Action::from_name(action).ok_or_else(|| error(format!("unknown action '{action}'")))?;
            entries.push((spec, action));
        }
        Ok(())
    }

    pub fn lookup(&self, section: Section, key: &KeyEvent) -> Option<Action> {
        let spec = KeySpec::from_event(key);
        self.sections[section.index()].iter().find(|(k, _)| *k == spec).map(|(_, a)| *a)
    }

    #[cfg(test)]
    pub fn bindings(&self, section: Section) -> &[(KeySpec, Action)] {
        &self.sections[section.index()]
    }

    /// The keys bound to `action` in `section`, for hints ("ctrl-c").
    pub fn keys_for(&self, section: Section, action: Action) -> Vec<String> {
        self.sections[section.index()].iter().filter(|(_, a)| *a == action).map(|(k, _)| k.to_string()).collect()
    }

    /// The first key of `action` in any section (global first), for hints.
    pub fn hint(&self, action: Action) -> Option<String> {
        Section::ALL.iter().find_map(|s| self.keys_for(*s, action).into_iter().next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossterm::event::KeyEventKind;

    fn raw_entries(text: &str) -> Vec<(Section, String, String)> {
        let file: KeymapFile = toml::from_str(text).unwrap();
        let mut out = Vec::new();
        for (section, entries) in [(Section::Global, file.global), (Section::Input, file.input), (Section::Browse, file.browse)] {
            for (key, action) in entries.0 {
                out.push((section, key, action));
            }
        }
        out
    }

    #[test]
    fn every_key_of_both_keymaps_parses_and_maps_to_its_action() {
        for (name, text) in [("default", DEFAULT_KEYMAP), ("vim", VIM_KEYMAP)] {
            let keymap = Keymap::load(name, &KeyOverrides::default()).unwrap();
            let entries = raw_entries(text);
            assert!(entries.len() > 20, "{name}");
            for (section, key, action) in entries {
                let spec = KeySpec::parse(&key).unwrap_or_else(|e| panic!("{name} {key}: {e}"));
                // The canonical string reads back as the same key.
                assert_eq!(KeySpec::parse(&spec.to_string()).unwrap(), spec, "{name} {key}");
                let expected = Action::from_name(&action).unwrap_or_else(|| panic!("{name} {key}: unknown action {action}"));
                let event = KeyEvent::new(spec.code, spec.modifiers);
                assert_eq!(keymap.lookup(section, &event), Some(expected), "{name} [{}] {key}", section.name());
            }
            // What every keymap must offer.
            let all: Vec<Action> = Section::ALL.iter().flat_map(|s| keymap.bindings(*s).iter().map(|(_, a)| *a)).collect();
            for needed in [Action::Submit, Action::Newline, Action::Interrupt, Action::Help, Action::NextPane, Action::EditMemory] {
                assert!(all.contains(&needed), "{name} lacks {needed:?}");
            }
        }
    }

    #[test]
    fn keys_keep_the_order_of_the_file_for_hints() {
        let keymap = Keymap::load("vim", &KeyOverrides::default()).unwrap();
        assert_eq!(keymap.keys_for(Section::Browse, Action::InsertMode), ["i", "a", "o"]);
        assert_eq!(keymap.hint(Action::Help).as_deref(), Some("f1"));
        let keymap = Keymap::load("default", &KeyOverrides::default()).unwrap();
        assert_eq!(keymap.keys_for(Section::Input, Action::Newline), ["alt-enter", "shift-enter", "ctrl-j"]);
    }

    #[test]
    fn terminal_reports_match_key_strings() {
        let keymap = Keymap::load("vim", &KeyOverrides::default()).unwrap();
        // An upper-case letter arrives with SHIFT on most terminals.
        let shifted = KeyEvent::new(KeyCode::Char('G'), KeyModifiers::SHIFT);
        assert_eq!(keymap.lookup(Section::Browse, &shifted), Some(Action::Bottom));
        let backtab = KeyEvent::new(KeyCode::BackTab, KeyModifiers::SHIFT);
        assert_eq!(keymap.lookup(Section::Global, &backtab), Some(Action::PrevPane));
        let mut ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        ctrl_c.kind = KeyEventKind::Repeat;
        assert_eq!(keymap.lookup(Section::Global, &ctrl_c), Some(Action::Interrupt));
        assert_eq!(keymap.lookup(Section::Global, &KeyEvent::new(KeyCode::Char('c'), KeyModifiers::NONE)), None);
        assert_eq!(KeySpec::parse("shift-g").unwrap(), KeySpec::parse("G").unwrap());
        assert_eq!(KeySpec::parse("ctrl-alt-x").unwrap().to_string(), "ctrl-alt-x");
        assert_eq!(KeySpec::parse("-").unwrap().code, KeyCode::Char('-'));
        assert_eq!(KeySpec::parse("ctrl--").unwrap().to_string(), "ctrl--");
        for bad in ["", "ctrl-", "hyper-x", "f13", "enterr"] {
            assert!(KeySpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn user_overrides_rebind_unbind_and_name_bad_entries() {
        let mut overrides = KeyOverrides::default();
        overrides.global.insert("ctrl-x".into(), "quit".into());
        overrides.global.insert("ctrl-q".into(), "none".into());
        overrides.browse.insert("x".into(), "forget_memory".into());
        // Directly under [ui.keys]: the global section.
        overrides.direct.insert("f12".into(), "help".into());
        let keymap = Keymap::load("default", &overrides).unwrap();
        assert_eq!(keymap.lookup(Section::Global, &KeyEvent::new(KeyCode::F(12), KeyModifiers::NONE)), Some(Action::Help));
        let key = |c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL);
        assert_eq!(keymap.lookup(Section::Global, &key('x')), Some(Action::Quit));
        assert_eq!(keymap.lookup(Section::Global, &key('q')), None);
        assert_eq!(keymap.lookup(Section::Browse, &KeyEvent::new(KeyCode::Char('x'), KeyModifiers::NONE)), Some(Action::ForgetMemory));

        overrides.input.insert("enter".into(), "launch_rockets".into());
        let error = Keymap::load("default", &overrides).unwrap_err().to_string();
        assert_eq!(error, "config [ui.keys.input] \"enter\": unknown action 'launch_rockets'");
        let mut overrides = KeyOverrides::default();
        overrides.input.insert("hyper-z".into(), "submit".into());
        assert!(Keymap::load("default", &overrides).unwrap_err().to_string().contains("hyper-z"));
        assert_eq!(Keymap::load("emacs", &KeyOverrides::default()).unwrap_err(), KeymapError::Unknown("emacs".into()));
    }
}
