//! `top`'s full screen (ratatui): the header, the table, the keys; and what each key does.
//!
//! Keys, as in htop and bpftop where they have one: `q` or Ctrl-C quits; `<` and `>` (or the
//! left and right arrows, or F6 for the next) choose the sort column, `r` (or `I`) reverses
//! it; `g` (or Tab) moves to the next grouping, `p`, `o`, `n` and `e` pick process, pod,
//! port (number) and remote endpoint; up and down scroll.
//!
//! Drawing is pure: [`draw`] renders a table into any ratatui backend, which is how the tests
//! check the screen (`TestBackend`).

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Paragraph, Row as TableRow, Table as TableWidget};
use ratatui::Frame;

use crate::top::view::{columns_that_fit, header_lines, Column, Group, Table, View};

/// What a key asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Quit,
    /// The view changed: redraw.
    Redraw,
    Nothing,
}

/// What the screen keeps between frames besides the view: how far it is scrolled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scroll(pub usize);

/// Applies one key to the view.
pub fn key(view: &mut View, scroll: &mut Scroll, k: KeyEvent) -> Action {
    let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
    match k.code {
        KeyCode::Char('c') if ctrl => return Action::Quit,
        KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
        KeyCode::Char('<') | KeyCode::Left => view.sort = view.sort.moved(-1),
        KeyCode::Char('>') | KeyCode::Right | KeyCode::F(6) => view.sort = view.sort.moved(1),
        KeyCode::Char('r') | KeyCode::Char('I') => view.reverse = !view.reverse,
        KeyCode::Char('g') | KeyCode::Tab => view.group = view.group.next(),
        KeyCode::Char('p') => view.group = Group::Process,
        KeyCode::Char('o') => view.group = Group::Pod,
        KeyCode::Char('n') => view.group = Group::Port,
        KeyCode::Char('e') => view.group = Group::Remote,
        KeyCode::Down | KeyCode::Char('j') => scroll.0 += 1,
        KeyCode::Up | KeyCode::Char('k') => scroll.0 = scroll.0.saturating_sub(1),
        KeyCode::PageDown => scroll.0 += 10,
        KeyCode::PageUp => scroll.0 = scroll.0.saturating_sub(10),
        KeyCode::Home => scroll.0 = 0,
        _ => return Action::Nothing,
    }
    Action::Redraw
}

/// The keys' line at the bottom.
const KEYS: &str =
    "q quit  < > sort  r reverse  g group (p process, o pod, n port, e remote)  up/down scroll";

/// Draws one screen of `table`.
pub fn draw(frame: &mut Frame, table: &Table, view: &View, scroll: &Scroll, source: &str) {
    let [header, body, keys] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let lines: Vec<Line> = header_lines(table, view, source)
        .into_iter()
        .map(Line::from)
        .collect();
    frame.render_widget(Paragraph::new(lines), header);
    frame.render_widget(
        Paragraph::new(KEYS).style(Style::new().add_modifier(Modifier::REVERSED)),
        keys,
    );

    let width = body.width as usize;
    let longest = table
        .rows
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(view.group.title().len(), 40);
    let cols = columns_that_fit(width, longest.min(24));
    let figures = (cols.len() - 1) * (Column::WIDTH + 1);
    let name_width = longest.min(width.saturating_sub(figures)).max(8);
    let widths: Vec<Constraint> = cols
        .iter()
        .map(|&c| match c {
            Column::Name => Constraint::Length(name_width as u16),
            _ => Constraint::Length(Column::WIDTH as u16),
        })
        .collect();
    let heading = TableRow::new(cols.iter().map(|&c| {
        let mut title = c.title(view.group).to_owned();
        if c == view.sort {
            title.push(if view.reverse { '▲' } else { '▼' });
        }
        match c {
            Column::Name => title,
            _ => format!("{title:>w$}", w = Column::WIDTH),
        }
    }))
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let visible = body.height.saturating_sub(1) as usize;
    let first = scroll
        .0
        .min(table.rows.len().saturating_sub(visible.max(1)));
    let rows = table.rows.iter().skip(first).take(visible).map(|r| {
        TableRow::new(cols.iter().map(|&c| {
            let text = r.cell(c);
            if c == Column::Name {
                crate::top::view::cut(&text, name_width)
            } else {
                format!("{text:>w$}", w = Column::WIDTH)
            }
        }))
    });
    frame.render_widget(
        TableWidget::new(rows, widths)
            .header(heading)
            .column_spacing(1),
        body,
    );
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;
    use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use ratatui::Terminal;

    use super::*;
    use crate::top::view::{fixture, table, Filter};

    fn screen(view: &View, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        let t = table(&fixture::frames(), view);
        terminal
            .draw(|f| draw(f, &t, view, &Scroll::default(), "own probe"))
            .unwrap();
        terminal.backend().to_string()
    }

    #[test]
    fn every_grouping_on_a_wide_screen() {
        for group in Group::ALL {
            let view = View {
                group,
                ..View::default()
            };
            insta::assert_snapshot!(format!("wide_{group:?}"), screen(&view, 140, 10));
        }
    }

    #[test]
    fn a_narrow_screen_keeps_the_telling_columns() {
        insta::assert_snapshot!(screen(&View::default(), 60, 10));
    }

    #[test]
    fn a_filter_and_a_sort_show_in_the_header() {
        let view = View {
            sort: Column::Received,
            reverse: true,
            filter: Filter {
                port: Some(80),
                ..Filter::default()
            },
            ..View::default()
        };
        insta::assert_snapshot!(screen(&view, 120, 8));
    }

    #[test]
    fn keys_change_the_view() {
        let press = |view: &mut View, code| {
            key(
                view,
                &mut Scroll::default(),
                KeyEvent::new(code, KeyModifiers::NONE),
            )
        };
        let mut view = View::default();
        assert_eq!(press(&mut view, KeyCode::Char('>')), Action::Redraw);
        assert_eq!(view.sort, Column::Failed);
        press(&mut view, KeyCode::Char('<'));
        press(&mut view, KeyCode::Char('<'));
        assert_eq!(view.sort, Column::Name);
        press(&mut view, KeyCode::Char('<'));
        assert_eq!(view.sort, Column::Rtt, "wraps round");
        press(&mut view, KeyCode::Char('r'));
        assert!(view.reverse);
        press(&mut view, KeyCode::Char('g'));
        assert_eq!(view.group, Group::Pod);
        press(&mut view, KeyCode::Char('e'));
        assert_eq!(view.group, Group::Remote);
        press(&mut view, KeyCode::Char('p'));
        assert_eq!(view.group, Group::Process);
        assert_eq!(press(&mut view, KeyCode::Char('z')), Action::Nothing);
        assert_eq!(press(&mut view, KeyCode::Char('q')), Action::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(key(&mut view, &mut Scroll::default(), ctrl_c), Action::Quit);
    }
}
