//! Starting a planned container: inside the pod's network namespace, in a mount namespace of its own
//! where each volume is bound at its mount path (so the program finds its token and certificates
//! where a pod has them), as the container's user.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::Context;

use super::{HOST_PATH, Process, volumes::Written};

/// Quoted for `sh`: the paths come from a pod spec.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The mount script: each volume's directory bound at its path, read-only where the pod says so,
/// and the pod's `/etc/hosts` over the host's, when it has one.
pub fn mount_script(
    process: &Process,
    volumes: &Written,
    hosts: Option<&Path>,
) -> anyhow::Result<String> {
    let mut script = String::from("set -e\n");
    if let Some(hosts) = hosts {
        script.push_str(&format!(
            "mount --bind {} /etc/hosts\n",
            quote(&hosts.display().to_string())
        ));
    }
    let sources = process
        .mounts
        .iter()
        .map(|m| {
            volumes
                .get(&m.volume)
                .with_context(|| format!("volume {} was not written", m.volume))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(m) = process
        .mounts
        .iter()
        .find(|m| process.program.starts_with(&m.path))
    {
        anyhow::bail!(
            "container {}: its mount at {} would hide its program {}",
            process.container,
            m.path,
            process.program.display()
        );
    }
    for (i, (m, source)) in process.mounts.iter().zip(&sources).enumerate() {
        // Each bind happens in the container's view, so a volume mounted over a directory that holds
        // a later volume's source (an emptyDir at /tmp over a harness dir in /tmp) would hide it.
        if let Some(hidden) = sources[i + 1..]
            .iter()
            .find(|later| later.starts_with(&m.path))
        {
            anyhow::bail!(
                "container {}: its mount at {} would hide volume source {}; keep the harness's \
                 directory out of paths pods mount over",
                process.container,
                m.path,
                hidden.display()
            );
        }
        let (source, target) = (quote(&source.display().to_string()), quote(&m.path));
        script.push_str(&format!(
            "mkdir -p {target}\nmount --bind {source} {target}\n"
        ));
        if m.read_only {
            script.push_str(&format!("mount -o remount,bind,ro {target}\n"));
        }
    }
    // The program and its arguments arrive as "$0" "$@", never through the shell's parsing.
    script.push_str("exec \"$0\" \"$@\"\n");
    Ok(script)
}

/// The command that runs `process` in network namespace `netns`: in a mount namespace of its own
/// with the pod's volumes and hosts file, as the container's user, with only the container's env.
pub fn command(
    netns: &str,
    process: &Process,
    volumes: &Written,
    hosts: Option<&Path>,
) -> anyhow::Result<Command> {
    let script = mount_script(process, volumes, hosts)?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .args(["unshare", "--mount", "--propagation", "private", "--"])
        .args(["sh", "-c", &script]);
    if let Some((uid, gid)) = process.user {
        cmd.args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
        ]);
    }
    cmd.arg(&process.program)
        .args(&process.args)
        .env_clear()
        .env("PATH", HOST_PATH)
        .envs(process.env.iter().map(|(k, v)| (k, v)));
    Ok(cmd)
}

/// Starts `process` in network namespace `netns`, its output to `log`.
pub fn spawn(
    netns: &str,
    process: &Process,
    volumes: &Written,
    hosts: Option<&Path>,
    log: std::fs::File,
) -> anyhow::Result<Child> {
    command(netns, process, volumes, hosts)?
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start container {}", process.container))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubelet::Mount;

    #[test]
    fn mounts_bind_each_volume_and_quote_what_the_pod_wrote() {
        let process = Process {
            container: "c".into(),
            init: false,
            program: "/bin/true".into(),
            args: vec![],
            env: vec![],
            user: None,
            mounts: vec![
                Mount {
                    volume: "token".into(),
                    path: "/var/run/secrets/tokens".into(),
                    read_only: true,
                },
                Mount {
                    volume: "odd".into(),
                    path: "/data/it's".into(),
                    read_only: false,
                },
            ],
            post_start: None,
            readiness: None,
        };
        let volumes: Written = [
            ("token".to_string(), "/pods/p/volumes/token".into()),
            ("odd".to_string(), "/pods/p/volumes/odd".into()),
        ]
        .into();
        assert_eq!(
            mount_script(&process, &volumes, None).expect("a script"),
            "set -e\nmkdir -p '/var/run/secrets/tokens'\nmount --bind '/pods/p/volumes/token' '/var/run/secrets/tokens'\n\
             mount -o remount,bind,ro '/var/run/secrets/tokens'\nmkdir -p '/data/it'\\''s'\n\
             mount --bind '/pods/p/volumes/odd' '/data/it'\\''s'\nexec \"$0\" \"$@\"\n"
        );
        let missing: Written = Default::default();
        assert!(mount_script(&process, &missing, None).is_err());
        let over_sources = Process {
            mounts: vec![
                Mount {
                    volume: "tmp".into(),
                    path: "/pods".into(),
                    read_only: false,
                },
                process.mounts[0].clone(),
            ],
            ..process.clone()
        };
        let volumes_with_tmp: Written = [
            ("token".to_string(), "/pods/p/volumes/token".into()),
            ("tmp".to_string(), "/pods/p/volumes/tmp".into()),
        ]
        .into();
        let refused = mount_script(&over_sources, &volumes_with_tmp, None)
            .expect_err("a mount over a later source is refused");
        assert!(
            refused
                .to_string()
                .contains("its mount at /pods would hide volume source /pods/p/volumes/token"),
            "{refused}"
        );
        let over_program = Process {
            program: "/pods/bin/app".into(),
            ..over_sources.clone()
        };
        let refused = mount_script(&over_program, &volumes_with_tmp, None)
            .expect_err("a mount over the program is refused");
        assert!(
            refused
                .to_string()
                .contains("would hide its program /pods/bin/app"),
            "{refused}"
        );
        let with_hosts =
            mount_script(&process, &volumes, Some(Path::new("/pods/p/hosts"))).expect("a script");
        assert!(
            with_hosts.starts_with("set -e\nmount --bind '/pods/p/hosts' /etc/hosts\n"),
            "{with_hosts}"
        );
    }
}
