//! Every link in the README and the guide (`docs/`) resolves: a relative link names a file or
//! folder of the repository, and its `#anchor` (in the same file or another Markdown file) a
//! heading there, by GitHub's rule; an absolute `http(s)` link is well formed (nothing is
//! fetched: the test needs no network and no root).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Component, Path, PathBuf};

/// In the kernel matrix's guests (`TRACER_KERNEL_MATRIX` set), says SKIPPED as the other tests
/// that do not depend on the kernel do, and returns true: the host runs these.
fn host_only(test: &str) -> bool {
    if std::env::var_os("TRACER_KERNEL_MATRIX").is_none() {
        return false;
    }
    println!(
        "SKIPPED {test}: the documentation's links, which do not depend on the kernel; it runs \
         on the host kernel (cargo xtask test)"
    );
    true
}

/// The repository's root (this crate is one folder below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// The files whose links are checked, relative to the root: README.md and docs/*.md.
fn checked_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("a readable entry of docs/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| p.strip_prefix(root).unwrap().to_path_buf())
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// A link as written: where, its text and its destination.
#[derive(Debug, PartialEq)]
struct Link {
    line: usize,
    text: String,
    target: String,
}

/// Whether `line` opens or closes a fenced code block: its fence character and length.
fn fence(line: &str) -> Option<(char, usize)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &line[indent..];
    let c = rest.chars().next()?;
    if c != '`' && c != '~' {
        return None;
    }
    let n = rest.chars().take_while(|&x| x == c).count();
    (n >= 3).then_some((c, n))
}

/// The lines of a Markdown text outside fenced code blocks, with their 1-based numbers
/// (lines inside a fence, and the fences, come back empty, so that paragraphs stay apart).
fn prose_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(char, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        // A closing fence is as long as the opening one at least, with nothing after it.
        let closes = |(c, n): (char, usize)| {
            fence(line).is_some_and(|(c2, n2)| c2 == c && n2 >= n)
                && line.trim().chars().all(|x| x == c)
        };
        match (open, fence(line)) {
            (None, Some(f)) => {
                open = Some(f);
                out.push((i + 1, String::new()));
            }
            (Some(f), Some(_)) if closes(f) => {
                open = None;
                out.push((i + 1, String::new()));
            }
            (Some(_), _) => out.push((i + 1, String::new())),
            (None, None) => out.push((i + 1, line.to_owned())),
        }
    }
    out
}

/// Every inline link and image (`[text](dest)`, `![alt](dest)`) and autolink (`<http...>`)
/// outside code blocks and code spans. Link texts may run over several lines; a code span
/// ends at its paragraph's end at the latest.
fn links(text: &str) -> Vec<Link> {
    let mut out = Vec::new();
    // The prose as one stream of characters, each with its line number.
    let mut chars: Vec<(char, usize)> = Vec::new();
    for (n, line) in prose_lines(text) {
        chars.extend(line.chars().map(|c| (c, n)));
        chars.push(('\n', n));
    }
    // Open brackets: index in `chars` where the text begins.
    let mut brackets: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (c, line) = chars[i];
        match c {
            '\\' => {
                i += 2;
                continue;
            }
            '`' => {
                // A code span: as many backticks close it, before a blank line.
                let n = chars[i..].iter().take_while(|(c, _)| *c == '`').count();
                let mut j = i + n;
                let mut closed = None;
                while j < chars.len() {
                    if chars[j].0 == '\n' && chars.get(j + 1).is_some_and(|(c, _)| *c == '\n') {
                        break;
                    }
                    if chars[j].0 == '`' {
                        let m = chars[j..].iter().take_while(|(c, _)| *c == '`').count();
                        if m == n {
                            closed = Some(j + m);
                            break;
                        }
                        j += m;
                        continue;
                    }
                    j += 1;
                }
                // An unclosed run of backticks is literal text.
                i = closed.unwrap_or(i + n);
                continue;
            }
            '\n' if chars.get(i + 1).is_some_and(|(c, _)| *c == '\n') => brackets.clear(),
            '[' => brackets.push(i + 1),
            ']' => {
                if let Some(start) = brackets.pop() {
                    if chars.get(i + 1).is_some_and(|(c, _)| *c == '(') {
                        if let Some((dest, end)) = destination(&chars, i + 2) {
                            let text: String = chars[start..i].iter().map(|(c, _)| *c).collect();
                            out.push(Link {
                                line: chars[start.saturating_sub(1)].1,
                                text: text.split_whitespace().collect::<Vec<_>>().join(" "),
                                target: dest,
                            });
                            // A link's text holds no other link.
                            brackets.clear();
                            i = end;
                            continue;
                        }
                    }
                }
            }
            '<' => {
                let rest: String = chars[i + 1..]
                    .iter()
                    .take_while(|(c, _)| *c != '>' && *c != '\n')
                    .map(|(c, _)| *c)
                    .collect();
                let lower = rest.to_ascii_lowercase();
                if (lower.starts_with("http://") || lower.starts_with("https://"))
                    && chars
                        .get(i + 1 + rest.chars().count())
                        .is_some_and(|(c, _)| *c == '>')
                {
                    out.push(Link {
                        line,
                        text: rest.clone(),
                        target: rest,
                    });
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The destination of an inline link whose `(` is just before `from`, and the index after its
/// `)`: `<...>` or a run without spaces (balanced parentheses allowed), then an optional title.
fn destination(chars: &[(char, usize)], from: usize) -> Option<(String, usize)> {
    let mut i = from;
    while chars.get(i).is_some_and(|(c, _)| *c == ' ') {
        i += 1;
    }
    let mut dest = String::new();
    if chars.get(i)?.0 == '<' {
        i += 1;
        while chars.get(i)?.0 != '>' {
            if chars[i].0 == '\n' {
                return None;
            }
            dest.push(chars[i].0);
            i += 1;
        }
        i += 1;
    } else {
        let mut depth = 0usize;
        loop {
            let c = chars.get(i)?.0;
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => break,
                ')' => depth -= 1,
                ' ' | '\n' => break,
                '\\' => {
                    i += 1;
                    dest.push(chars.get(i)?.0);
                    i += 1;
                    continue;
                }
                _ => {}
            }
            dest.push(c);
            i += 1;
        }
    }
    // An optional title, then the closing parenthesis.
    while chars.get(i).is_some_and(|(c, _)| *c == ' ' || *c == '\n') {
        i += 1;
    }
    if let Some(&(q @ ('"' | '\''), _)) = chars.get(i) {
        i += 1;
        while chars.get(i)?.0 != q {
            i += 1;
        }
        i += 1;
        while chars.get(i).is_some_and(|(c, _)| *c == ' ' || *c == '\n') {
            i += 1;
        }
    }
    (chars.get(i)?.0 == ')').then_some((dest, i + 1))
}

/// GitHub's anchor of a heading's text: the text as rendered (code spans without their
/// backticks, links by their text), lowercased, without punctuation but `-` and `_`, each
/// space a `-`.
fn slug(heading: &str) -> String {
    // Links and images by their text.
    let mut text = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else {
            break;
        };
        text.push_str(rest[..open].trim_end_matches('!'));
        text.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    text.push_str(rest);
    text.chars()
        .flat_map(char::to_lowercase)
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown text's headings (ATX headings outside code blocks), the second
/// of a name with `-1`, the third `-2`, as GitHub makes them.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let t = line.trim_start_matches(' ');
        if line.len() - t.len() > 3 {
            continue;
        }
        let hashes = t.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) {
            continue;
        }
        let rest = &t[hashes..];
        if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t')) {
            continue;
        }
        // A closing run of `#` (after a space) is not part of the text.
        let mut title = rest.trim();
        let stripped = title.trim_end_matches('#');
        if stripped.is_empty() || stripped.ends_with(' ') {
            title = stripped.trim_end();
        }
        let base = slug(title);
        let n = seen.entry(base.clone()).or_insert(0);
        let anchor = if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        *n += 1;
        out.insert(anchor);
    }
    out
}

/// Why an absolute URL is not well formed, if it is not: `scheme://host[:port][/...]`, with a
/// host of letters, digits, `-` and `.` (or `[IPv6]`), and no spaces, quotes, angle brackets or
/// control characters, and every `%` followed by two hex digits.
fn malformed_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
        return Some(format!("scheme {scheme:?} is neither http nor https"));
    }
    if let Some(c) = url
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '<' | '>' | '\\'))
    {
        return Some(format!("{c:?} in a URL"));
    }
    let bytes = url.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        {
            return Some("a % not followed by two hex digits".into());
        }
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return Some("an IPv6 host without its ]".into());
        };
        if addr.is_empty()
            || !addr
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Some(format!("IPv6 host {addr:?}"));
        }
        (addr, after.strip_prefix(':'))
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Some("no host".into());
    }
    if !hostport.starts_with('[')
        && (!host
            .chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == '.')
            || host.starts_with(['.', '-'])
            || host.contains(".."))
    {
        return Some(format!("host {host:?}"));
    }
    if let Some(p) = port {
        if p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()) || p.parse::<u16>().is_err() {
            return Some(format!("port {p:?}"));
        }
    }
    None
}

/// `path` (relative to the folder `base`, both relative to the root) made plain: `..` taken
/// off, or `None` if it would leave the repository.
fn normalise(base: &Path, path: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in base.join(path).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// What is wrong with each link of `file` (relative to `root`), as `file:line: [text](target):
/// reason`. `read` gives a Markdown file's text by its path relative to the root.
fn broken(
    root: &Path,
    file: &Path,
    text: &str,
    read: &mut dyn FnMut(&Path) -> Option<String>,
) -> Vec<String> {
    let base = file.parent().unwrap_or(Path::new(""));
    let mut out = Vec::new();
    for link in links(text) {
        let mut fail = |why: String| {
            out.push(format!(
                "{}:{}: [{}]({}): {why}",
                file.display(),
                link.line,
                link.text,
                link.target
            ))
        };
        let target = link.target.as_str();
        if target.is_empty() {
            fail("an empty destination".into());
            continue;
        }
        let lower = target.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            if let Some(why) = malformed_url(target) {
                fail(format!("not a well-formed URL: {why}"));
            }
            continue;
        }
        if lower.starts_with("mailto:") {
            continue;
        }
        if let Some((scheme, _)) = target.split_once(':') {
            if !scheme.is_empty()
                && !scheme.contains('/')
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            {
                fail(format!(
                    "scheme {scheme:?}: only relative paths and http(s) URLs are allowed"
                ));
                continue;
            }
        }
        let (path, anchor) = match target.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (target, None),
        };
        if path.contains('?') {
            fail("a query in a relative link".into());
            continue;
        }
        let resolved = if path.is_empty() {
            file.to_path_buf()
        } else {
            match normalise(base, path) {
                Some(p) => p,
                None => {
                    fail("leaves the repository".into());
                    continue;
                }
            }
        };
        let on_disk = root.join(&resolved);
        if !on_disk.exists() {
            fail(format!("no such file: {}", resolved.display()));
            continue;
        }
        let Some(anchor) = anchor else { continue };
        if on_disk.is_dir() || on_disk.extension().is_none_or(|e| e != "md") {
            fail(format!(
                "an anchor into {}, which is not a Markdown file",
                resolved.display()
            ));
            continue;
        }
        let Some(target_text) = read(&resolved) else {
            fail(format!("cannot read {}", resolved.display()));
            continue;
        };
        if !anchors(&target_text).contains(anchor) {
            fail(format!(
                "no heading of {} has the anchor #{anchor}",
                resolved.display()
            ));
        }
    }
    out
}

#[test]
fn every_link_of_the_readme_and_the_guide_resolves() {
    if host_only("every_link_of_the_readme_and_the_guide_resolves") {
        return;
    }
    let root = root();
    let files = checked_files(&root);
    assert!(files.len() > 1, "docs/ holds no Markdown file: {files:?}");
    let mut read = |p: &Path| fs::read_to_string(root.join(p)).ok();
    let mut problems = Vec::new();
    let mut count = 0;
    for file in &files {
        let text = fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        count += links(&text).len();
        problems.extend(broken(&root, file, &text, &mut read));
    }
    eprintln!("{count} links in {} files", files.len());
    // Not an empty check: the README links every page of the guide.
    assert!(
        count >= files.len(),
        "only {count} links found in {files:?}"
    );
    assert!(
        problems.is_empty(),
        "{} broken links:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn every_page_of_the_guide_is_linked_from_the_readme_and_the_guides_index() {
    if host_only("every_page_of_the_guide_is_linked_from_the_readme_and_the_guides_index") {
        return;
    }
    let root = root();
    let pages: Vec<PathBuf> = checked_files(&root)
        .into_iter()
        .filter(|p| p.starts_with("docs"))
        .collect();
    let mut missing = Vec::new();
    for (index, base) in [("README.md", ""), ("docs/README.md", "docs")] {
        let text = fs::read_to_string(root.join(index)).unwrap();
        let linked: BTreeSet<PathBuf> = links(&text)
            .iter()
            .filter_map(|l| normalise(Path::new(base), l.target.split('#').next().unwrap()))
            .collect();
        for page in &pages {
            if page != Path::new(index) && !linked.contains(page) {
                missing.push(format!("{index} does not link {}", page.display()));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

#[test]
fn anchors_follow_githubs_rule() {
    if host_only("anchors_follow_githubs_rule") {
        return;
    }
    let text = "# tracer\n\
                ## Stuck sockets: `GET /sockets` and `tracer sockets`\n\
                ### Connection records: `tracer watch --connections`\n\
                ## The probe's log\n\
                ## Two paths, three threads: a scrape never costs events\n\
                ## The `port` label ##\n\
                ## tracer_tcp_bytes_total\n\
                ## Notes\n\
                ## Notes\n\
                ## Notes\n\
                ```\n\
                # a shell comment, not a heading\n\
                ```\n\
                #not a heading\n\
                ## See [Kernels](kernels.md)\n";
    let got = anchors(text);
    let want: BTreeSet<String> = [
        "tracer",
        "stuck-sockets-get-sockets-and-tracer-sockets",
        "connection-records-tracer-watch---connections",
        "the-probes-log",
        "two-paths-three-threads-a-scrape-never-costs-events",
        "the-port-label",
        "tracer_tcp_bytes_total",
        "notes",
        "notes-1",
        "notes-2",
        "see-kernels",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(got, want);
}

#[test]
fn links_are_found_in_prose_only_and_across_lines() {
    if host_only("links_are_found_in_prose_only_and_across_lines") {
        return;
    }
    let text = "See [Live\n  counters](records.md#live) and ![a](b.png \"title\").\n\
                `[not](a-link)` and ``[nor](this)``, nor in a fence:\n\
                ```\n[x](y)\n```\n\
                A <https://example.com/a?b=c> and [p(1)](a_(b).md).\n\
                [unclosed `code\n\n[after](z.md)\n";
    let got: Vec<(usize, String, String)> = links(text)
        .into_iter()
        .map(|l| (l.line, l.text, l.target))
        .collect();
    let want = vec![
        (1, "Live counters".into(), "records.md#live".into()),
        (2, "a".into(), "b.png".into()),
        (
            7,
            "https://example.com/a?b=c".into(),
            "https://example.com/a?b=c".into(),
        ),
        (7, "p(1)".into(), "a_(b).md".into()),
        (10, "after".into(), "z.md".into()),
    ];
    assert_eq!(got, want);
}

#[test]
fn broken_links_are_named_with_their_file_and_line() {
    if host_only("broken_links_are_named_with_their_file_and_line") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tracer-links-{}", std::process::id()));
    fs::create_dir_all(dir.join("docs")).unwrap();
    fs::write(dir.join("docs/a.md"), "# A page\n\n## Its part\n").unwrap();
    let readme = "# Top\n\
                  [ok](docs/a.md) [ok](docs/a.md#its-part) [ok](#top) [ok](docs/)\n\
                  [gone](docs/b.md)\n\
                  [no anchor](docs/a.md#nothing)\n\
                  [self](#nowhere)\n\
                  [out](../../etc/passwd)\n\
                  [url](https://ex_ample.com) [url](https://example.com:99999/) [url](http://)\n\
                  [fine](https://github.com/aya-rs/aya#readme) [ftp](ftp://example.com)\n";
    fs::write(dir.join("README.md"), readme).unwrap();
    let mut read = |p: &Path| fs::read_to_string(dir.join(p)).ok();
    let got = broken(&dir, Path::new("README.md"), readme, &mut read);
    fs::remove_dir_all(&dir).unwrap();
    let lines: Vec<&str> = got.iter().map(|p| p.split(": ").next().unwrap()).collect();
    assert_eq!(
        lines,
        [
            "README.md:3",
            "README.md:4",
            "README.md:5",
            "README.md:6",
            "README.md:7",
            "README.md:7",
            "README.md:7",
            "README.md:8",
        ],
        "{got:#?}"
    );
    assert!(got[0].contains("no such file: docs/b.md"), "{}", got[0]);
    assert!(
        got[1].contains("no heading of docs/a.md has the anchor #nothing"),
        "{}",
        got[1]
    );
    assert!(
        got[2].contains("no heading of README.md has the anchor #nowhere"),
        "{}",
        got[2]
    );
    assert!(got[3].contains("leaves the repository"), "{}", got[3]);
}
