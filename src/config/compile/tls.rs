//! `tls:`: the extra CA files trusted for targets, read relative to the config file.

use std::path::{Path, PathBuf};

use super::Compiler;
use crate::config::schema::TlsSection;
use crate::config::{Problem, TlsTrust};

impl Compiler<'_> {
    pub(super) fn tls(&mut self, config_path: &Path, s: &TlsSection) -> Option<TlsTrust> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut extra = Vec::new();
        for file in &s.ca_files {
            let raw = self.expand(file)?;
            let mut path = PathBuf::from(raw);
            if path.is_relative() {
                if let Some(dir) = config_path.parent() {
                    path = dir.join(path);
                }
            }
            let certs: Result<Vec<_>, _> = match CertificateDer::pem_file_iter(&path) {
                Ok(iter) => iter.collect(),
                Err(e) => {
                    self.problem(Problem::spanned(
                        file,
                        format!("cannot read CA file {}: {e}", path.display()),
                    ));
                    continue;
                }
            };
            match certs {
                Ok(c) if !c.is_empty() => extra.extend(c),
                Ok(_) => self.problem(Problem::spanned(
                    file,
                    format!("{} holds no PEM certificate", path.display()),
                )),
                Err(e) => self.problem(Problem::spanned(file, format!("{}: {e}", path.display()))),
            }
        }
        match TlsTrust::new(extra) {
            Ok(t) => Some(t),
            Err(e) => {
                let at = s.ca_files.first()?;
                self.problem(Problem::spanned(at, e));
                None
            }
        }
    }
}
