//! Merging the lab's admin context into a user's kubeconfig (`installer kubeconfig --merge`)
//! and taking it out again (`down`). Files are rewritten with mode 0600.

use std::path::Path;

use anyhow::{anyhow, Context as _};
use serde_json::{json, Value};

fn read(path: &Path) -> anyhow::Result<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(crate::yaml::documents(&text)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?
            .into_iter()
            .next()
            .unwrap_or_else(empty)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(empty()),
        Err(e) => Err(anyhow!("{}: {e}", path.display())),
    }
}

fn empty() -> Value {
    json!({"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [], "contexts": [], "current-context": "", "preferences": {}})
}

fn list<'a>(doc: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    if !doc[key].is_array() {
        doc[key] = json!([]);
    }
    doc[key].as_array_mut().expect("array")
}

fn upsert(items: &mut Vec<Value>, item: Value) {
    let name = item["name"].clone();
    items.retain(|i| i["name"] != name);
    items.push(item);
}

/// Copies the current context of `from` (the lab's kubeconfig) into `into` as `context`
/// (its cluster and user renamed to match) and makes it current. Returns the context name.
pub fn merge(from: &Path, into: &Path, context: &str) -> anyhow::Result<String> {
    let src = read(from)?;
    let current = src["current-context"].as_str().unwrap_or_default().to_owned();
    let find = |key: &str, name: &str| -> anyhow::Result<Value> {
        src[key]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == name))
            .cloned()
            .ok_or_else(|| anyhow!("{}: no {key} entry {name:?}", from.display()))
    };
    let ctx = find("contexts", &current)?;
    let cluster = find("clusters", ctx["context"]["cluster"].as_str().unwrap_or_default())?;
    let user = find("users", ctx["context"]["user"].as_str().unwrap_or_default())?;

    let mut dst = read(into)?;
    upsert(
        list(&mut dst, "clusters"),
        json!({"name": context, "cluster": cluster["cluster"]}),
    );
    upsert(list(&mut dst, "users"), json!({"name": context, "user": user["user"]}));
    let mut new_ctx = ctx["context"].clone();
    new_ctx["cluster"] = json!(context);
    new_ctx["user"] = json!(context);
    upsert(list(&mut dst, "contexts"), json!({"name": context, "context": new_ctx}));
    dst["current-context"] = json!(context);
    crate::state::write_private(into, crate::yaml::to_string(&dst).as_bytes())
        .with_context(|| format!("writing {}", into.display()))?;
    Ok(context.to_owned())
}

/// Removes `context` and its same-named cluster and user from `file`, if present.
pub fn remove_context(file: &Path, context: &str) -> anyhow::Result<()> {
    if !file.exists() {
        return Ok(());
    }
    let mut doc = read(file)?;
    for key in ["contexts", "clusters", "users"] {
        list(&mut doc, key).retain(|i| i["name"] != context);
    }
    if doc["current-context"] == context {
        doc["current-context"] = json!("");
    }
    crate::state::write_private(file, crate::yaml::to_string(&doc).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn merge_then_remove_leaves_other_contexts() {
        let dir = tempfile::tempdir().unwrap();
        let lab = dir.path().join("lab");
        std::fs::write(
            &lab,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sre-lab\n  cluster:\n    server: https://10.5.0.2:6443\n    certificate-authority-data: Q0E=\nusers:\n- name: admin@sre-lab\n  user:\n    client-certificate-data: Q0VSVA==\n    client-key-data: S0VZ\ncontexts:\n- name: admin@sre-lab\n  context:\n    cluster: sre-lab\n    user: admin@sre-lab\n    namespace: default\ncurrent-context: admin@sre-lab\n",
        )
        .unwrap();
        let user = dir.path().join("config");
        std::fs::write(
            &user,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: prod\n  cluster: {server: 'https://prod:6443'}\nusers:\n- name: prod\n  user: {token: abc}\ncontexts:\n- name: prod\n  context: {cluster: prod, user: prod}\ncurrent-context: prod\n",
        )
        .unwrap();
        merge(&lab, &user, "admin@sre-lab").unwrap();
        let doc = read(&user).unwrap();
        assert_eq!(doc["current-context"], "admin@sre-lab");
        assert_eq!(doc["contexts"].as_array().unwrap().len(), 2);
        let c = doc["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "admin@sre-lab")
            .unwrap();
        assert_eq!(c["cluster"]["server"], "https://10.5.0.2:6443");
        assert_eq!(std::fs::metadata(&user).unwrap().permissions().mode() & 0o777, 0o600);

        remove_context(&user, "admin@sre-lab").unwrap();
        let doc = read(&user).unwrap();
        assert_eq!(doc["contexts"].as_array().unwrap().len(), 1);
        assert_eq!(doc["users"][0]["name"], "prod");
        assert_eq!(doc["current-context"], "");
    }
}
