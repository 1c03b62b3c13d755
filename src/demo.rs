//! `outpost demo` (being written).

/// Run the demo.
pub async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Err("the demo is not written yet".into())
}
