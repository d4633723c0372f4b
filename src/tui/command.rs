//! Slash commands typed in the input.

use std::path::PathBuf;

use memlora::memory::MemoryId;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Image(PathBuf),
    Remember(String),
    Forget(MemoryId),
    Search(String),
    Undo,
    Ingest(PathBuf),
    Adapters,
    Model,
    Clear,
    Help,
    Quit,
}

/// Every command with its usage, for /help.
pub const COMMANDS: [(&str, &str); 11] = [
    ("/image PATH", "attach an image (a preview only: the vision model is not available yet)"),
    ("/remember TEXT", "store TEXT as a memory, as written"),
    ("/forget ID", "forget memory #ID"),
    ("/search QUERY", "search the memories (shown in the memories pane)"),
    ("/undo", "revert the last change to memory"),
    ("/ingest PATH", "feed a conversation file through the memory pipeline (a background job)"),
    ("/adapters", "show the adapters pane"),
    ("/model", "show the model in the chat"),
    ("/clear", "clear the chat (memories stay)"),
    ("/help", "keys and commands"),
    ("/quit", "quit"),
];

/// Parses a line starting with `/`. The error is a message for the user.
pub fn parse(line: &str) -> Result<Command, String> {
    let line = line.trim();
    let body = line.strip_prefix('/').ok_or_else(|| format!("'{line}' is not a command"))?;
    let (name, argument) = match body.find(char::is_whitespace) {
        Some(at) => (&body[..at], body[at..].trim()),
        None => (body, ""),
    };
    let needs = |what: &str, placeholder: &str| -> Result<String, String> {
        if argument.is_empty() {
            Err(format!("/{name} needs {what}: /{name} {placeholder}"))
        } else {
            Ok(argument.to_owned())
        }
    };
    let no_argument = |command: Command| -> Result<Command, String> {
        if argument.is_empty() {
            Ok(command)
        } else {
            Err(format!("/{name} takes no argument"))
        }
    };
    match name {
        "image" => Ok(Command::Image(expand_home(&needs("a path", "PATH")?))),
        "remember" => Ok(Command::Remember(needs("text", "TEXT")?)),
        "forget" => {
            let id = needs("a memory id", "ID")?;
            let id = id.trim_start_matches('#');
            id.parse().map(Command::Forget).map_err(|_| format!("/forget needs a memory id (a number like 3), not '{id}'"))
        }
        "search" => Ok(Command::Search(needs("a query", "QUERY")?)),
        "undo" => no_argument(Command::Undo),
        "ingest" => Ok(Command::Ingest(expand_home(&needs("a path", "PATH")?))),
        "adapters" => no_argument(Command::Adapters),
        "model" => no_argument(Command::Model),
        "clear" => no_argument(Command::Clear),
        "help" | "?" => no_argument(Command::Help),
        "quit" | "q" | "exit" => no_argument(Command::Quit),
        "" => Err("a command name goes after the /; /help lists them".into()),
        other => Err(format!("unknown command /{other}; /help lists the commands")),
    }
}

fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_with_their_arguments() {
        assert_eq!(parse("/image ./cat 1.png"), Ok(Command::Image(PathBuf::from("./cat 1.png"))));
        assert_eq!(parse("/remember  I like tea "), Ok(Command::Remember("I like tea".into())));
        assert_eq!(parse("/forget 12"), Ok(Command::Forget(12)));
        assert_eq!(parse("/forget #7"), Ok(Command::Forget(7)));
        assert_eq!(parse("/search where does Alice live"), Ok(Command::Search("where does Alice live".into())));
        assert_eq!(parse("/adapters"), Ok(Command::Adapters));
        assert_eq!(parse("/model"), Ok(Command::Model));
        assert_eq!(parse("/help"), Ok(Command::Help));
        assert_eq!(parse("/quit"), Ok(Command::Quit));
        assert_eq!(parse("/undo"), Ok(Command::Undo));
        assert_eq!(parse("/ingest chat.txt"), Ok(Command::Ingest(PathBuf::from("chat.txt"))));
        assert_eq!(parse("/clear"), Ok(Command::Clear));
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(parse("/image ~/a.png"), Ok(Command::Image(PathBuf::from(home).join("a.png"))));
        }
        // Every documented command parses.
        for (usage, _) in COMMANDS {
            let example = usage.replace("PATH", "x").replace("TEXT", "x").replace("ID", "1").replace("QUERY", "x");
            assert!(parse(&example).is_ok(), "{usage}");
        }
    }

    #[test]
    fn bad_commands_get_a_message() {
        assert_eq!(parse("/frobnicate"), Err("unknown command /frobnicate; /help lists the commands".into()));
        assert_eq!(parse("/image"), Err("/image needs a path: /image PATH".into()));
        assert_eq!(parse("/forget"), Err("/forget needs a memory id: /forget ID".into()));
        assert_eq!(parse("/forget abc"), Err("/forget needs a memory id (a number like 3), not 'abc'".into()));
        assert_eq!(parse("/search  "), Err("/search needs a query: /search QUERY".into()));
        assert_eq!(parse("/quit now"), Err("/quit takes no argument".into()));
        assert!(parse("/").unwrap_err().contains("/help"));
    }
}
