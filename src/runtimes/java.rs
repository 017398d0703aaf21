//! Java's names, read from the source: javac wants `public class HelloWorld` in
//! `HelloWorld.java`, and `java` wants the name of the class that declares `main`. A judge
//! or a course sends `class Solution` or `public class HelloWorld` as `code`; these find
//! the names so both run. A small scanner, not a parser: comments, string, text-block and
//! char literals are skipped, braces counted, and only top-level type declarations and
//! `static ... void main(` members directly inside them are looked at. What it cannot
//! tell falls back to the runtime's `file_name` and the file's stem, as before.

/// The top-level types of `source`, in order: (name, declared public, declares main).
fn top_level_types(source: &[u8]) -> Vec<(String, bool, bool)> {
    let text = String::from_utf8_lossy(source);
    let tokens = tokens(&text);
    let mut types: Vec<(String, bool, bool)> = Vec::new();
    let mut depth = 0usize;
    // Tokens of the declaration being read (since the last `;`, `{` or `}`).
    let mut statement: Vec<&str> = Vec::new();
    for &token in &tokens {
        match token {
            "{" => {
                if depth == 0
                    && let Some(at) = statement
                        .iter()
                        .position(|t| matches!(*t, "class" | "interface" | "enum" | "record"))
                    && let Some(name) = statement.get(at + 1).filter(|n| is_identifier(n))
                {
                    let public = statement[..at].contains(&"public");
                    types.push((name.to_string(), public, false));
                }
                depth += 1;
                statement.clear();
            }
            "}" => {
                depth = depth.saturating_sub(1);
                statement.clear();
            }
            ";" => statement.clear(),
            "(" if depth == 1
                && statement.last() == Some(&"main")
                && statement.contains(&"static")
                && statement.contains(&"void") =>
            {
                if let Some(current) = types.last_mut() {
                    current.2 = true;
                }
                statement.push(token);
            }
            _ => statement.push(token),
        }
    }
    types
}

/// The public top-level class, which javac wants in a file of its name.
pub fn public_class(source: &[u8]) -> Option<String> {
    top_level_types(source)
        .into_iter()
        .find(|(_, public, _)| *public)
        .map(|(name, _, _)| name)
}

/// The top-level class to run: the one declaring `main` (the public one first, if several
/// do), else the public class.
pub fn main_class(source: &[u8]) -> Option<String> {
    let types = top_level_types(source);
    types
        .iter()
        .filter(|(_, _, main)| *main)
        .max_by_key(|(_, public, _)| *public)
        .or_else(|| types.iter().find(|(_, public, _)| *public))
        .map(|(name, _, _)| name.clone())
}

fn is_identifier(token: &str) -> bool {
    let mut chars = token.chars();
    chars
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
}

/// Identifiers and the punctuation `{ } ( ) ;`, with comments and literals left out.
fn tokens(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if let Some(inner) = rest.strip_prefix("/*") {
            i += inner.find("*/").map_or(rest.len(), |end| end + 4);
        } else if let Some(inner) = rest.strip_prefix("\"\"\"") {
            i += 3 + skip_literal(inner, "\"\"\"");
        } else if let Some(inner) = rest.strip_prefix('"') {
            i += 1 + skip_literal(inner, "\"");
        } else if let Some(inner) = rest.strip_prefix('\'') {
            i += 1 + skip_literal(inner, "'");
        } else if matches!(bytes[i], b'{' | b'}' | b'(' | b')' | b';') {
            out.push(&text[i..i + 1]);
            i += 1;
        } else if let Some(c) = rest
            .chars()
            .next()
            .filter(|c| c.is_alphabetic() || *c == '_' || *c == '$')
        {
            let len = rest
                .char_indices()
                .find(|(_, c)| !(c.is_alphanumeric() || *c == '_' || *c == '$'))
                .map_or(rest.len(), |(at, _)| at);
            out.push(&rest[..len.max(c.len_utf8())]);
            i += len.max(c.len_utf8());
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    out
}

/// Bytes up to and including the `end` that closes a literal (a backslash escapes one
/// character); the whole rest when it never closes.
fn skip_literal(rest: &str, end: &str) -> usize {
    let mut i = 0;
    while i < rest.len() {
        if rest[i..].starts_with('\\') {
            i += 1 + rest[i + 1..].chars().next().map_or(0, char::len_utf8);
        } else if rest[i..].starts_with(end) {
            return i + end.len();
        } else {
            i += rest[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    rest.len()
}

#[cfg(test)]
mod tests {
    use super::{main_class, public_class};

    #[test]
    fn names_come_from_the_source() {
        let cases: &[(&str, Option<&str>, Option<&str>)] = &[
            (
                "public class HelloWorld { public static void main(String[] a) {} }",
                Some("HelloWorld"),
                Some("HelloWorld"),
            ),
            (
                "import java.util.*;\nclass Solution {\n  public static void main(String... args) { }\n}",
                None,
                Some("Solution"),
            ),
            (
                "class Helper { void main() {} }\n@SuppressWarnings(\"x\") public final class App {\n static public void main(String[] a) { String s = \"}\"; char c = '{'; }\n}",
                Some("App"),
                Some("App"),
            ),
            (
                "// public class Commented {}\n/* public class Nope { */ class Real { public static void main(String[] a) { /* } */ } }",
                None,
                Some("Real"),
            ),
            (
                "class Outer { static class Inner { public static void main(String[] a) {} } }",
                None,
                None,
            ),
            (
                "public class Text { static String t = \"\"\"\n } class X {\n\"\"\"; public static void main(String[] a) {} }",
                Some("Text"),
                Some("Text"),
            ),
            ("print(1)", None, None),
        ];
        for (source, public, main) in cases {
            assert_eq!(
                public_class(source.as_bytes()).as_deref(),
                *public,
                "{source}"
            );
            assert_eq!(main_class(source.as_bytes()).as_deref(), *main, "{source}");
        }
    }
}
