//! What a group's shared history keeps of one member's private tools: in a
//! group, every later request (whoever asks, whoever pays) carries the
//! chat's stored conversation, so the results of tools that read a
//! member's own files and notes are stored withheld. The member who asked
//! got them in their own requests and saw the answer; nobody else's request
//! replays them (or pays for their tokens).

use serde_json::Value;

/// Tools whose results are one member's private data.
pub const PRIVATE_TOOLS: &[&str] = &["list_files", "read_file", "recall"];

/// What a withheld `tool_result` says instead of its content.
pub const WITHHELD: &str = "[withheld: one member's files and notes are not kept in the group's shared history]";

/// `turns` with the `tool_result` content of every [`PRIVATE_TOOLS`] call
/// replaced by [`WITHHELD`] (the blocks stay, so every `tool_use` keeps its
/// `tool_result`, as the Messages API requires).
pub fn withhold_private_tool_results(turns: &[(&'static str, Vec<Value>)]) -> Vec<(&'static str, Vec<Value>)> {
    let private_ids: Vec<&str> = turns
        .iter()
        .flat_map(|(_, blocks)| blocks.iter())
        .filter(|b| b["type"] == "tool_use" && b["name"].as_str().is_some_and(|n| PRIVATE_TOOLS.contains(&n)))
        .filter_map(|b| b["id"].as_str())
        .collect();
    turns
        .iter()
        .map(|(role, blocks)| {
            let blocks = blocks
                .iter()
                .map(|b| {
                    let private = b["type"] == "tool_result"
                        && b["tool_use_id"].as_str().is_some_and(|id| private_ids.contains(&id));
                    let mut b = b.clone();
                    if private {
                        b["content"] = Value::String(WITHHELD.to_owned());
                    }
                    b
                })
                .collect();
            (*role, blocks)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_private_tool_results_are_withheld() {
        let turns = vec![
            (
                "assistant",
                vec![
                    json!({"type": "tool_use", "id": "a", "name": "read_file", "input": {"id": 1}}),
                    json!({"type": "tool_use", "id": "b", "name": "calculator", "input": {"expression": "1+1"}}),
                ],
            ),
            (
                "user",
                vec![
                    json!({"type": "tool_result", "tool_use_id": "a", "content": "secret salary table"}),
                    json!({"type": "tool_result", "tool_use_id": "b", "content": "2"}),
                ],
            ),
        ];
        let kept = withhold_private_tool_results(&turns);
        assert_eq!(kept[1].1[0]["content"], WITHHELD);
        assert_eq!(kept[1].1[0]["tool_use_id"], "a");
        assert_eq!(kept[1].1[1]["content"], "2");
        assert_eq!(kept[0], turns[0]);
    }
}
