//! The port the domain tells "approvals changed" through: whatever pushes
//! that news to dashboards and MCP clients.

/// Listeners for approval changes (an envelope created or decided).
#[cfg_attr(test, mockall::automock)]
pub trait ApprovalEvents: Send + Sync {
    /// Approvals changed. Returns whether at least one connected MCP client
    /// was sent `notifications/tools/list_changed` (the
    /// `meta.notification_emitted` of a decision).
    ///
    /// Must not block: delivery happens in the background.
    fn approvals_changed(&self) -> bool;
}
