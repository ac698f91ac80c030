// The outbox pages' one script (app/outbox_view). The pages work without it; with it the list
// updates live (Server-Sent Events from /outbox/events), filters as you type, deletes without a
// reload, and a message's views become tabs (WAI-ARIA tabs pattern: arrow keys, Home, End).
// Rows are built with textContent only: nothing from an email is ever parsed as HTML here.
"use strict";

(function () {
  function plural(count) {
    return count + (count === 1 ? " email" : " emails");
  }

  // ---- the list page ----
  function setUpList(table) {
    var body = table.tBodies[0];
    var filter = document.getElementById("filter");
    var count = document.getElementById("count");
    var deleteAll = document.getElementById("delete-all");

    function rows() {
      return Array.prototype.slice.call(body.rows);
    }

    function matches(row) {
      var query = filter.value.trim().toLowerCase();
      if (!query) return true;
      var to = row.cells[1].textContent.toLowerCase();
      var subject = row.cells[2].textContent.toLowerCase();
      return to.indexOf(query) !== -1 || subject.indexOf(query) !== -1;
    }

    function refresh() {
      var visible = 0;
      rows().forEach(function (row) {
        row.hidden = !matches(row);
        if (!row.hidden) visible += 1;
      });
      count.textContent = plural(visible);
      var empty = document.getElementById("empty");
      if (body.rows.length === 0 && !filter.value.trim()) {
        table.hidden = true;
        if (!empty) {
          empty = document.createElement("p");
          empty.id = "empty";
          empty.textContent = "No emails yet.";
          count.insertAdjacentElement("afterend", empty);
        }
      } else {
        table.hidden = false;
        if (empty) empty.remove();
      }
    }

    function cell(row, text) {
      var td = row.insertCell(-1);
      td.textContent = text;
      return td;
    }

    function addRow(message) {
      if (body.querySelector('tr[data-id="' + message.id + '"]')) return;
      var row = document.createElement("tr");
      row.dataset.id = message.id;
      var time = document.createElement("time");
      time.dateTime = message.time;
      time.textContent = message.time.replace("T", " ").replace("Z", "");
      row.insertCell(-1).appendChild(time);
      cell(row, message.to);
      var link = document.createElement("a");
      link.href = "/outbox/" + encodeURIComponent(message.id);
      link.textContent = message.subject || "(no subject)";
      row.insertCell(-1).appendChild(link);
      cell(row, message.route || "");
      body.insertBefore(row, body.firstChild); // the newest email so far
    }

    function removeRows(ids) {
      ids.forEach(function (id) {
        var row = body.querySelector('tr[data-id="' + id + '"]');
        if (row) row.remove();
      });
    }

    filter.addEventListener("input", refresh);
    filter.form.addEventListener("submit", function (event) {
      event.preventDefault(); // filtering happens as you type
      refresh();
    });

    deleteAll.addEventListener("click", function (event) {
      event.preventDefault();
      fetch("/outbox", { method: "DELETE" }).then(function (answer) {
        if (answer.ok) {
          removeRows(rows().map(function (row) { return row.dataset.id; }));
          refresh();
        }
      });
    });

    if (window.EventSource) {
      var source = new EventSource("/outbox/events");
      source.addEventListener("message", function (event) {
        addRow(JSON.parse(event.data));
        refresh();
      });
      source.addEventListener("deleted", function (event) {
        removeRows(JSON.parse(event.data).ids);
        refresh();
      });
      window.addEventListener("pagehide", function () { source.close(); });
    }
    refresh();
  }

  // ---- the message page ----
  function setUpTabs(tablist) {
    var tabs = Array.prototype.slice.call(tablist.querySelectorAll('[role="tab"]'));

    function select(tab, focus) {
      tabs.forEach(function (other) {
        var selected = other === tab;
        other.setAttribute("aria-selected", selected ? "true" : "false");
        other.tabIndex = selected ? 0 : -1;
        document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
      });
      if (focus) tab.focus();
    }

    tabs.forEach(function (tab, index) {
      tab.addEventListener("click", function () { select(tab, false); });
      tab.addEventListener("keydown", function (event) {
        var next = null;
        if (event.key === "ArrowRight") next = tabs[(index + 1) % tabs.length];
        else if (event.key === "ArrowLeft") next = tabs[(index - 1 + tabs.length) % tabs.length];
        else if (event.key === "Home") next = tabs[0];
        else if (event.key === "End") next = tabs[tabs.length - 1];
        if (next) {
          event.preventDefault();
          select(next, true);
        }
      });
    });
    tablist.hidden = false;
    document.body.classList.add("tabbed");
    select(tabs[0], false);
  }

  function setUpDelete(button) {
    button.addEventListener("click", function (event) {
      event.preventDefault();
      var url = "/outbox/" + encodeURIComponent(button.dataset.id);
      fetch(url, { method: "DELETE" }).then(function (answer) {
        if (answer.ok || answer.status === 404) window.location.assign("/outbox");
      });
    });
  }

  document.documentElement.classList.add("js");
  var table = document.getElementById("messages");
  if (table) setUpList(table);
  var tablist = document.querySelector('[role="tablist"]');
  if (tablist) setUpTabs(tablist);
  var remove = document.getElementById("delete");
  if (remove) setUpDelete(remove);
})();
