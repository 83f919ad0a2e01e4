//! The port the approval service tells "approvals changed" through:
//! whatever pushes that news to dashboards and MCP clients.

/// Listeners for approval changes (an envelope created or decided).
#[cfg_attr(test, mockall::automock)]
pub trait ApprovalEvents: Send + Sync {
    /// Approvals changed. Who hears of it, and whether anyone did, is the
    /// listeners' business.
    ///
    /// Must not block: delivery happens in the background.
    fn approvals_changed(&self);
}
