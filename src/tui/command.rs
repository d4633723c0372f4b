//! Slash commands typed in the input.

use std::path::PathBuf;

use memlora::adapters::merge::MergeMethod;
use memlora::adapters::MergeSpec;
use memlora::memory::MemoryId;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Image(PathBuf),
    Remember(String),
    Forget(MemoryId),
    Search(String),
    Undo,
    Ingest(PathBuf),
    Merge(MergeSpec),
    Adapters,
    Model,
    Clear,
    Help,
    Quit,
}

/// Every command with its usage, for /help.
pub const COMMANDS: [(&str, &str); 12] = [
    ("/image PATH", "attach an image: it is previewed, and your next message asks the vision model about it"),
    ("/remember TEXT", "store TEXT as a memory, as written"),
    ("/forget ID", "forget memory #ID"),
    ("/search QUERY", "search the memories (shown in the memories pane)"),
    ("/undo", "revert the last change to memory"),
    ("/ingest PATH", "feed a conversation file through the memory pipeline (a background job)"),
    ("/adapters", "show the adapters pane"),
    (
        "/merge A B[=W]… --into NAME",
        "merge installed adapters (--method linear|ties|dare, --rank N, --density D, --drop P, --seed S, --op OP); a background job",
    ),
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
        "merge" => parse_merge(&needs("adapters and a name", "A B --into NAME")?).map(Command::Merge),
        "model" => no_argument(Command::Model),
        "clear" => no_argument(Command::Clear),
        "help" | "?" => no_argument(Command::Help),
        "quit" | "q" | "exit" => no_argument(Command::Quit),
        "" => Err("a command name goes after the /; /help lists them".into()),
        other => Err(format!("unknown command /{other}; /help lists the commands")),
    }
}

/// `A B=0.5 --into C --method ties --density 0.3 --rank 8 --op generate`.
fn parse_merge(argument: &str) -> Result<MergeSpec, String> {
    let mut adapters = Vec::new();
    let (mut into, mut method, mut rank, mut operation) = (None, "linear".to_owned(), 8, None);
    let (mut density, mut drop_rate, mut seed) = (0.2f32, 0.9f32, 7u64);
    let mut words = argument.split_whitespace();
    while let Some(word) = words.next() {
        let Some(option) = word.strip_prefix("--") else {
            adapters.push(word.to_owned());
            continue;
        };
        let value = words.next().ok_or_else(|| format!("/merge: --{option} needs a value"))?;
        let number = |what: &str| format!("/merge: --{option} needs {what}, not '{value}'");
        match option {
            "into" => into = Some(value.to_owned()),
            "method" => method = value.to_owned(),
            "rank" => rank = value.parse().ok().filter(|r| *r > 0).ok_or_else(|| number("a rank of at least 1"))?,
            "density" => density = value.parse().map_err(|_| number("a number"))?,
            "drop" => drop_rate = value.parse().map_err(|_| number("a number"))?,
            "seed" => seed = value.parse().map_err(|_| number("a whole number"))?,
            "op" => operation = Some(value.to_owned()),
            other => return Err(format!("/merge: unknown option --{other}")),
        }
    }
    let method = match method.as_str() {
        "linear" => MergeMethod::Linear,
        "ties" => MergeMethod::Ties { density },
        "dare" => MergeMethod::Dare { drop_rate, seed },
        other => return Err(format!("/merge: --method is linear, ties or dare, not '{other}'")),
    };
    let into = into.ok_or("/merge needs --into NAME, the name of the merged adapter")?;
    if adapters.is_empty() {
        return Err("/merge needs the adapters to merge: /merge A B --into NAME".into());
    }
    Ok(MergeSpec { adapters, into, method, rank, operation })
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
        let spec = |adapters: &[&str], method| MergeSpec {
            adapters: adapters.iter().map(|a| a.to_string()).collect(),
            into: "c".into(),
            method,
            rank: 8,
            operation: None,
        };
        assert_eq!(parse("/merge a b --into c"), Ok(Command::Merge(spec(&["a", "b"], MergeMethod::Linear))));
        assert_eq!(
            parse("/merge a=0.5 --method ties --density 0.3 b --into c"),
            Ok(Command::Merge(spec(&["a=0.5", "b"], MergeMethod::Ties { density: 0.3 })))
        );
        assert_eq!(
            parse("/merge a b --into c --method dare --drop 0.5 --seed 3 --rank 4 --op extract"),
            Ok(Command::Merge(MergeSpec {
                rank: 4,
                operation: Some("extract".into()),
                ..spec(&["a", "b"], MergeMethod::Dare { drop_rate: 0.5, seed: 3 })
            }))
        );
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(parse("/image ~/a.png"), Ok(Command::Image(PathBuf::from(home).join("a.png"))));
        }
        // Every documented command parses.
        for (usage, _) in COMMANDS {
            let example = usage
                .replace("PATH", "x")
                .replace("TEXT", "x")
                .replace("ID", "1")
                .replace("QUERY", "x")
                .replace("[=W]…", "")
                .replace(" NAME", " n");
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
        assert_eq!(parse("/merge a b"), Err("/merge needs --into NAME, the name of the merged adapter".into()));
        assert_eq!(parse("/merge --into c"), Err("/merge needs the adapters to merge: /merge A B --into NAME".into()));
        assert_eq!(parse("/merge a --into"), Err("/merge: --into needs a value".into()));
        assert_eq!(parse("/merge a --into c --method avg"), Err("/merge: --method is linear, ties or dare, not 'avg'".into()));
        assert_eq!(parse("/merge a --into c --rank 0"), Err("/merge: --rank needs a rank of at least 1, not '0'".into()));
        assert_eq!(parse("/merge a --into c --frob 1"), Err("/merge: unknown option --frob".into()));
    }
}
