//! Lets everyone in and allows every message. The principal's user id is the `user` query
//! parameter (or `anonymous`), so logs and routers still have something to go by.
//!
//! Use it to try the policy plumbing, or as the starting point of your own policy.

use avatar_policy_sdk::auth::*;

struct AllowAll;

impl Guest for AllowAll {
    fn authorize_connect(request: ConnectRequest) -> ConnectDecision {
        let user = request.query_param("user").filter(|u| !u.is_empty());
        ConnectDecision::Allow(Principal::user(user.unwrap_or_else(|| "anonymous".into())))
    }

    fn authorize_message(_request: MessageRequest) -> Verdict {
        Verdict::Allow
    }
}

avatar_policy_sdk::export_auth!(AllowAll);
