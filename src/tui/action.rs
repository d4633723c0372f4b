//! Everything a key can do. Keymaps (config/keymap-*.toml and `[ui.keys]`) name these in
//! snake_case.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Send the input (a message, a command, or an edited memory).
    Submit,
    Newline,
    HistoryPrev,
    HistoryNext,
    /// Close what is open, stop the running answer, or leave an edit.
    Cancel,
    /// Stop the running answer; quit when there is none.
    Interrupt,
    Quit,
    Help,
    NextPane,
    PrevPane,
    FocusChat,
    FocusMemories,
    FocusAdapters,
    FocusImage,
    MoveUp,
    MoveDown,
    PageUp,
    PageDown,
    Top,
    Bottom,
    /// Search the memories (starts `/search ` in the input).
    Search,
    EditMemory,
    ForgetMemory,
    /// Type in the input (vim: insert mode).
    InsertMode,
    /// Stop typing (vim: normal mode).
    NormalMode,
    /// Start a command in the input (`/`).
    Command,
}

impl Action {
    pub const ALL: [Action; 26] = [
        Action::Submit,
        Action::Newline,
        Action::HistoryPrev,
        Action::HistoryNext,
        Action::Cancel,
        Action::Interrupt,
        Action::Quit,
        Action::Help,
        Action::NextPane,
        Action::PrevPane,
        Action::FocusChat,
        Action::FocusMemories,
        Action::FocusAdapters,
        Action::FocusImage,
        Action::MoveUp,
        Action::MoveDown,
        Action::PageUp,
        Action::PageDown,
        Action::Top,
        Action::Bottom,
        Action::Search,
        Action::EditMemory,
        Action::ForgetMemory,
        Action::InsertMode,
        Action::NormalMode,
        Action::Command,
    ];

    /// The snake_case name used in keymap files.
    #[cfg(test)]
    pub fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    }

    pub fn from_name(name: &str) -> Option<Action> {
        serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
    }

    /// One line for the help overlay.
    pub fn describe(self) -> &'static str {
        match self {
            Action::Submit => "send the message, command or edited memory",
            Action::Newline => "new line in the input",
            Action::HistoryPrev => "previous input (when the input is empty or on its first line)",
            Action::HistoryNext => "next input",
            Action::Cancel => "close / stop the answer / leave the edit or search",
            Action::Interrupt => "stop the answer; quit when idle",
            Action::Quit => "quit (waits for a memory operation to finish; again: now)",
            Action::Help => "this help",
            Action::NextPane => "next pane",
            Action::PrevPane => "previous pane",
            Action::FocusChat => "chat pane",
            Action::FocusMemories => "memories pane",
            Action::FocusAdapters => "adapters pane",
            Action::FocusImage => "image pane",
            Action::MoveUp => "up (select a memory / scroll the chat)",
            Action::MoveDown => "down",
            Action::PageUp => "page up",
            Action::PageDown => "page down",
            Action::Top => "to the top",
            Action::Bottom => "to the bottom (the chat follows new text)",
            Action::Search => "search the memories",
            Action::EditMemory => "edit the selected memory in the input",
            Action::ForgetMemory => "forget the selected memory (asks y/n)",
            Action::InsertMode => "type in the input",
            Action::NormalMode => "stop typing (keys move and act on panes)",
            Action::Command => "start a /command",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_has_a_snake_case_name_that_round_trips() {
        for action in Action::ALL {
            let name = action.name();
            assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{name}");
            assert_eq!(Action::from_name(&name), Some(action));
            assert!(!action.describe().is_empty());
        }
        assert_eq!(Action::from_name("forget_memory"), Some(Action::ForgetMemory));
        assert_eq!(Action::from_name("ForgetMemory"), None);
    }
}
