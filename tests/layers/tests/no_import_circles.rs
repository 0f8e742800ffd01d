//! No file of any workspace member reaches itself again through the files it uses (issue #17).

use std::fs;

#[test]
fn no_import_circles() {
    let root = layers::root();
    let toml = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = layers::members(&toml).unwrap();
    assert!(
        members.iter().any(|m| m == "plugin"),
        "members read wrongly: {members:?}"
    );
    let mut report = String::new();
    for member in &members {
        let krate = layers::analyze(&root.join(member)).unwrap_or_else(|e| panic!("{member}: {e}"));
        for circle in krate.circles() {
            report += &format!("{member}: {}", krate.describe(&circle));
        }
    }
    assert!(
        report.is_empty(),
        "import circles between files (remove one of the uses listed in each circle):\n{report}"
    );
}
