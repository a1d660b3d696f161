//! `${VAR}` and `${VAR:-default}` expansion of one scalar's text.
//!
//! `tree.rs` applies it to every scalar value of the file and writes the result back in the
//! scalar's place, keeping a map so that line and column numbers in errors stay those of the
//! file the user edited. `$${` writes a literal `${`.

/// Expands variables in `input`, reading them through `lookup`.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    if !input.contains('$') {
        return Ok(input.to_string());
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            out.push_str("${");
            rest = escaped;
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let end = body
            .find('}')
            // The input is not quoted: it may be a secret written into the file.
            .ok_or_else(|| "unterminated ${ (no closing })".to_string())?;
        let expr = &body[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid variable name {name:?}"));
        }
        match (lookup(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
                ))
            }
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::expand;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_set_default_and_escape() {
        assert_eq!(expand("a${SET}b", env).unwrap(), "avalueb");
        assert_eq!(expand("${UNSET:-dflt}", env).unwrap(), "dflt");
        assert_eq!(expand("${EMPTY:-dflt}", env).unwrap(), "dflt");
        assert_eq!(expand("${SET:-dflt}", env).unwrap(), "value");
        assert_eq!(expand("$${SET}", env).unwrap(), "${SET}");
        assert_eq!(expand("cost $5", env).unwrap(), "cost $5");
        assert_eq!(expand("${A:-x:-y}", env).unwrap(), "x:-y");
    }

    #[test]
    fn unset_without_default_and_malformed_are_errors() {
        assert!(expand("${UNSET}", env)
            .unwrap_err()
            .contains("UNSET is not set"));
        assert!(expand("${SET", env).is_err());
        assert!(expand("${B-AD}", env).is_err());
    }
}
