//! Waiting after a 401 across instances. The instance replaying a mutation that waits for
//! fresh credentials announces it (`P:auth:waiting`, renewed while it waits); whichever instance
//! the app's next request reaches shares the credentials it carries (`P:auth:cred:<principal>`,
//! and `P:auth:cred:*` for mutations of no principal), and the replaying instance reads them.
//! They are bearer tokens: kept an hour at most, encoded with the time they were offered, so
//! that credentials older than the 401 are never taken for fresh ones.

use std::time::Duration;

use bytes::Bytes;

use super::Shared;
use crate::store::StoreError;

/// How long shared credentials are kept for a waiting mutation (they are tokens: not longer).
const CREDENTIALS_TTL: Duration = Duration::from_secs(3600);

impl Shared {
    pub(super) async fn share_credentials_inner(
        &self,
        principal: &str,
        credentials: &[(String, Bytes)],
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let blob = postcard::to_stdvec(&(at_ms, credentials))?;
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        // Under the principal, and as the newest of anyone's for mutations of no principal.
        for name in [principal, "*"] {
            pipe.cmd("SET")
                .arg(self.keys.credentials(name))
                .arg(blob.as_slice())
                .arg("PX")
                .arg(CREDENTIALS_TTL.as_millis() as u64)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    pub(super) async fn shared_credentials_inner(
        &self,
        principal: &str,
        since_ms: u64,
    ) -> Result<Option<Vec<(String, Bytes)>>, StoreError> {
        let mut conn = self.conn.clone();
        let blob: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.credentials(principal))
            .query_async(&mut conn)
            .await?;
        let Some(blob) = blob else {
            return Ok(None);
        };
        let (at, credentials): (u64, Vec<(String, Bytes)>) = postcard::from_bytes(&blob)?;
        Ok((at > since_ms).then_some(credentials))
    }

    pub(super) async fn announce_waiting_inner(&self, ttl: Duration) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(self.keys.auth_waiting())
            .arg(1)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    pub(super) async fn anyone_waiting_inner(&self) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("EXISTS")
            .arg(self.keys.auth_waiting())
            .query_async(&mut conn)
            .await?)
    }
}
