//! `signing.secrets:`: each `whsec_` secret parsed into the signer, never quoted in a problem,
//! and whether the development secret is among them.

use super::Compiler;
use crate::config::schema::Pos;
use crate::config::tree::SecretKind;
use crate::config::{Problem, DEVELOPMENT_SECRET};
use crate::signing::{Secret, Signer};

impl Compiler<'_> {
    pub(super) fn signing(&mut self, secrets: &Pos<Vec<Pos<String>>>) -> (Option<Signer>, bool) {
        if secrets.value.is_empty() {
            self.problem(Problem::spanned(
                secrets,
                "signing.secrets must list at least one whsec_ secret",
            ));
            return (None, false);
        }
        let mut parsed = Vec::new();
        let mut dev = false;
        for (i, s) in secrets.value.iter().enumerate() {
            let Some(text) = self.expand_secret(s, SecretKind::Opaque) else {
                continue;
            };
            dev |= text.expose() == DEVELOPMENT_SECRET;
            match Secret::parse(text.expose()) {
                Ok(secret) => parsed.push(secret),
                // The error names the format, never the secret's value.
                Err(e) => self.problem(Problem::secret(
                    s,
                    format!("signing.secrets[{i}]: invalid signing secret: {e}"),
                )),
            }
        }
        if parsed.len() != secrets.value.len() {
            return (None, dev);
        }
        // `parsed` is non-empty here (checked above), the only way `Signer::new` fails.
        (Signer::new(parsed).ok(), dev)
    }
}
