//! Certificates made by the test with `openssl`: a CA, a server
//! certificate for 127.0.0.1 signed by it, a client certificate signed by
//! it, and a second CA that signed nothing here (the "wrong CA").

use std::path::PathBuf;

use crate::basics::unique_suffix;

/// A folder of PEM files, removed when dropped.
pub struct TestCerts {
    pub dir: PathBuf,
}

impl TestCerts {
    /// Generates every file (EC P-256 keys, PKCS#8, valid two days).
    pub fn generate() -> TestCerts {
        let dir = std::env::temp_dir().join(format!("olt-certs-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let certs = TestCerts { dir };
        certs.self_signed("ca");
        certs.self_signed("other-ca");
        certs.signed(
            "server",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        );
        certs.signed("client", "olt-client", "extendedKeyUsage=clientAuth");
        certs
    }

    /// `name.pem` (a certificate) or `name.key`.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn openssl(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("openssl is required");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn self_signed(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=olt-{name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    fn signed(&self, name: &str, common_name: &str, extension: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(self.dir.join(&ext), format!("{extension}\n")).unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={common_name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// A file's path, as text for URLs and flags.
    pub fn file(&self, file: &str) -> String {
        let path = self.path(file);
        path.to_str().expect("a UTF-8 temporary path").to_owned()
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
