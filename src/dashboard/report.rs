//! A run's report as one self-contained HTML file: its history as JSON inside the page,
//! drawn by the page's own script (nothing is fetched).

use super::history::History;

const TEMPLATE: &str = include_str!("report.html");
const DATA_MARK: &str = "/*REPORT_DATA*/";

pub fn render(history: &History) -> String {
    // Inside <script>, "</" could end the element early: JSON allows "\/" for "/".
    let data = serde_json::to_string(history)
        .unwrap_or_else(|_| "{}".to_string())
        .replace("</", "<\\/");
    super::page(TEMPLATE).replacen(DATA_MARK, &data, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PrefixStats;

    #[test]
    fn the_history_goes_into_the_page_and_cannot_close_its_script() {
        let mut history = History::new();
        history
            .prefixes
            .push(PrefixStats::new("</script><b>".into()));
        let page = render(&history);
        assert!(!page.contains(DATA_MARK) && !page.contains("/*PAGE_"));
        assert!(
            page.contains("function prefixColor"),
            "the shared script is in"
        );
        assert!(page.contains(r#""name":"<\/script><b>""#), "{page}");
        assert_eq!(page.matches("</script>").count(), 2);
    }
}
