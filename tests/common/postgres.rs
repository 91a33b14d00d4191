//! A private PostgreSQL cluster for one test: `initdb` into a temporary directory (as
//! `nobody` when the tests run as root, since PostgreSQL refuses root), a server on a free
//! loopback port with password authentication, stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "gitfleet";
pub const PASSWORD: &str = "correct horse battery staple";

pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    server: Option<Child>,
}

/// Where Debian's packages put the server's programs (not on `PATH`), newest first.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries.flatten().map(|entry| entry.path().join("bin")).filter(|bin| bin.join("initdb").is_file()).collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|bin| {
        bin.parent().and_then(|version| version.file_name()?.to_str()?.parse::<u32>().ok()).unwrap_or(0)
    });
    versions.pop().expect("PostgreSQL's server programs in /usr/lib/postgresql/*/bin (tests/setup.sh installs them)")
}

/// `program` as the user that owns the cluster.
fn as_owner(program: &Path) -> Command {
    if super::running_as_root() {
        let mut command = Command::new("setpriv");
        command.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, PASSWORD).expect("password file");
        if super::running_as_root() {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
            for path in [&data, &password_file] {
                std::os::unix::fs::chown(path, Some(65534), Some(65534)).expect("chown to nobody");
            }
        }
        let output = as_owner(&bin_dir().join("initdb"))
            .args(["--auth=scram-sha-256", "--encoding=UTF8", "--no-sync", "--username", USER])
            .arg("--pwfile")
            .arg(&password_file)
            .arg("-D")
            .arg(&data)
            .output()
            .expect("initdb runs");
        assert!(output.status.success(), "initdb: {}", String::from_utf8_lossy(&output.stderr));
        let port = super::free_port();
        let mut postgres = Self { dir, port, server: None };
        postgres.run();
        postgres
    }

    /// Starts the server on the cluster and waits until it takes connections.
    pub fn run(&mut self) {
        let data = self.dir.path().join("data");
        let server = as_owner(&bin_dir().join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"])
            // Its socket goes beside its data, in a directory its user owns.
            .arg("-k")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres starts");
        self.server = Some(server);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.admin() {
                Ok(_) => return,
                Err(error) => assert!(Instant::now() < deadline, "PostgreSQL did not start: {error}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tests' own connection, through the server's socket (whatever TCP requires).
    fn admin(&self) -> Result<postgres::Client, postgres::Error> {
        let mut config = postgres::Config::new();
        config.host_path(self.dir.path().join("data")).port(self.port).user(USER).password(PASSWORD).dbname("postgres");
        config.connect(postgres::NoTls)
    }

    /// Restarts the server with TLS (`cert` and `key`, PEM) required on TCP: a connection
    /// without TLS is refused.
    pub fn require_tls(&mut self, cert: &Path, key: &Path) {
        use std::os::unix::fs::PermissionsExt as _;
        let data = self.dir.path().join("data");
        for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
            let target = data.join(to);
            std::fs::copy(from, &target).expect("copy into the data directory");
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            if super::running_as_root() {
                std::os::unix::fs::chown(&target, Some(65534), Some(65534)).expect("chown to nobody");
            }
        }
        let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).expect("conf");
        std::io::Write::write_all(&mut conf, b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
            .expect("write conf");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .expect("write pg_hba.conf");
        self.stop();
        self.run();
    }

    /// Stops the server (a fast shutdown, as a restart by an operator does).
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = Command::new("kill").args(["-INT", &server.id().to_string()]).status();
            let _ = server.wait();
        }
    }

    /// A URL with the password in it, for the tests' own connections.
    pub fn url(&self, database: &str) -> String {
        let password = PASSWORD.replace(' ', "%20");
        format!("postgres://{USER}:{password}@127.0.0.1:{}/{database}", self.port)
    }

    /// A URL without the password, as an operator gives it with a password file.
    pub fn url_without_password(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// A new, empty database.
    pub fn database(&self, name: &str) -> String {
        let mut client = self.admin().expect("connect");
        client.batch_execute(&format!("CREATE DATABASE {name}")).expect("create database");
        self.url_without_password(name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
