// SPDX-License-Identifier: LGPL-2.1-or-later
// See main_window.hpp.
#include "main_window.hpp"

#include <QApplication>
#include <QChartView>
#include <QDateTime>
#include <QHBoxLayout>
#include <QHeaderView>
#include <QLabel>
#include <QListView>
#include <QMessageBox>
#include <QPainter>
#include <QPushButton>
#include <QSplitter>
#include <QStatusBar>
#include <QStyledItemDelegate>
#include <QTabWidget>
#include <QVBoxLayout>

namespace otpgate::console {

namespace {

// "Key ready" as a level gauge: a progress bar of the ring's fill with the bytes on it.
class GaugeDelegate : public QStyledItemDelegate {
 public:
  using QStyledItemDelegate::QStyledItemDelegate;
  void paint(QPainter* painter, const QStyleOptionViewItem& option,
             const QModelIndex& index) const override {
    const QVariant fill = index.data(Qt::UserRole + 1);
    if (!fill.isValid()) return QStyledItemDelegate::paint(painter, option, index);
    QStyleOptionProgressBar bar;
    bar.rect = option.rect.adjusted(2, 3, -2, -3);
    bar.minimum = 0;
    bar.maximum = 1000;
    bar.progress = int(fill.toDouble() * 1000);
    bar.text = index.data(Qt::DisplayRole).toString();
    bar.textVisible = true;
    bar.state = option.state | QStyle::State_Horizontal;
    QApplication::style()->drawControl(QStyle::CE_ProgressBar, &bar, painter);
  }
};

QTableView* table(QAbstractItemModel* model, QWidget* parent) {
  auto* view = new QTableView(parent);
  view->setModel(model);
  view->setSelectionBehavior(QAbstractItemView::SelectRows);
  view->setSelectionMode(QAbstractItemView::SingleSelection);
  view->horizontalHeader()->setStretchLastSection(true);
  view->verticalHeader()->hide();
  view->setAlternatingRowColors(true);
  view->setWordWrap(false);
  QObject::connect(model, &QAbstractItemModel::modelReset, view, [view] {
    if (view->property("sized").toBool() || view->model()->rowCount() == 0) return;
    view->resizeColumnsToContents();  // once, when data first arrives; then the user's widths
    view->setProperty("sized", true);
  });
  return view;
}
}  // namespace

MainWindow::MainWindow(QWidget* parent) : QMainWindow(parent) {
  setWindowTitle("otp-console: QKD key and one-time-pad links");
  started_ms_ = QDateTime::currentMSecsSinceEpoch();
  auto* tabs = new QTabWidget(this);

  // Key supplies: the table over a chart of consumption and refill per site.
  auto* keys_page = new QSplitter(Qt::Vertical, tabs);
  auto* key_view = table(&key_supplies_, keys_page);
  key_view_ = key_view;
  key_view->setItemDelegateForColumn(KeySupplyModel::ready, new GaugeDelegate(key_view));
  connect(&key_supplies_, &QAbstractItemModel::modelReset, key_view, [key_view] {
    key_view->setColumnWidth(KeySupplyModel::ready,
                             std::max(key_view->columnWidth(KeySupplyModel::ready), 120));
  });
  chart_ = new QChart();
  x_axis_ = new QValueAxis(chart_);
  x_axis_->setTitleText("seconds");
  y_axis_ = new QValueAxis(chart_);
  y_axis_->setTitleText("bit/s");
  y_axis_->setLabelFormat("%.0f");
  chart_->addAxis(x_axis_, Qt::AlignBottom);
  chart_->addAxis(y_axis_, Qt::AlignLeft);
  // Selecting a supply charts it; selecting nothing charts the sites' totals.
  connect(key_view->selectionModel(), &QItemSelectionModel::selectionChanged, this, [this] {
    const QModelIndexList rows = key_view_->selectionModel()->selectedRows();
    selected_supply_.clear();
    if (!rows.isEmpty()) {
      const auto& r = key_supplies_.rows().at(std::size_t(rows.first().row()));
      selected_supply_ = r.site + "|" + r.stream + "|" + r.direction;
    }
    redraw();
  });
  auto* chart_view = new QChartView(chart_, keys_page);
  chart_view->setRenderHint(QPainter::Antialiasing);
  chart_view->setMinimumHeight(220);
  keys_page->addWidget(key_view);
  keys_page->addWidget(chart_view);
  tabs->addTab(keys_page, "Key supplies");

  tabs->addTab(table(&streams_, tabs), "Streams");

  auto* transfers = new QWidget(tabs);
  auto* layout = new QVBoxLayout(transfers);
  job_view_ = table(&jobs_, transfers);
  layout->addWidget(job_view_);
  auto* buttons = new QHBoxLayout();
  start_ = new QPushButton("Start", transfers);
  abort_ = new QPushButton("Abort", transfers);
  delete_ = new QPushButton("Delete", transfers);
  buttons->addWidget(start_);
  buttons->addWidget(abort_);
  buttons->addWidget(delete_);
  buttons->addStretch();
  layout->addLayout(buttons);
  connect(start_, &QPushButton::clicked, this, [this] { job_action("start"); });
  connect(abort_, &QPushButton::clicked, this, [this] { job_action("abort"); });
  connect(delete_, &QPushButton::clicked, this, [this] { job_action("delete"); });
  tabs->addTab(transfers, "Transfers");

  auto* alerts_view = new QListView(tabs);
  alerts_view->setModel(&alerts_);
  tabs->addTab(alerts_view, "Alerts");
  connect(&alerts_, &AlertLog::raised, this,
          [this](const QString& text) { statusBar()->showMessage("Alert: " + text, 10000); });

  setCentralWidget(tabs);
  services_label_ = new QLabel(this);
  statusBar()->addPermanentWidget(services_label_);
  resize(1200, 720);
}

void MainWindow::add_service(ServicePoller::Kind kind, const QUrl& url, int poll_ms) {
  auto* service = new ServicePoller(kind, url, this);
  services_.push_back(service);
  const QString name = url.toString();
  if (kind == ServicePoller::Kind::gateway) {
    connect(service, &ServicePoller::updated, this,
            [this, service](const QJsonObject& status) { on_gateway(service, status); });
  } else {
    connect(service, &ServicePoller::updated, this, [this, name](const QJsonObject& jobs) {
      jobs_.update_site(name, jobs);
      alerts_.check_jobs(name, jobs);
    });
  }
  connect(service, &ServicePoller::availability_changed, this,
          [this, name](bool up, const QString& error) {
            alerts_.service_availability(name, up, error);
            update_service_label();
          });
  service->start(poll_ms);
  update_service_label();
}

void MainWindow::on_gateway(ServicePoller*, const QJsonObject& status) {
  key_supplies_.update_site(status);
  streams_.update_site(status);
  alerts_.check_gateway(status.value("site").toString(), status);
  // The chart's history: the site's totals and each of its supplies.
  const QString site = status.value("site").toString();
  const qint64 now = QDateTime::currentMSecsSinceEpoch();
  double consumption = 0, fetched = 0;
  for (const auto& row : key_supplies_.rows()) {
    if (row.site != site) continue;
    consumption += row.consumption_bps;
    fetched += row.fetched_bytes;
    record(row.site + "|" + row.stream + "|" + row.direction, row.consumption_bps,
           row.fetched_bytes, now);
  }
  record(site, consumption, fetched, now);
  redraw();
}

void MainWindow::record(const QString& key, double consumption_bps, double fetched_bytes,
                        qint64 now) {
  History& h = history_[key];
  const double t = double(now - started_ms_) / 1000;
  double refill = 0;
  if (h.last_fetched >= 0 && now > h.last_ms)
    refill = std::max(0.0, (fetched_bytes - h.last_fetched) * 8 * 1000 / double(now - h.last_ms));
  h.last_fetched = fetched_bytes;
  h.last_ms = now;
  h.consumption.append(QPointF(t, consumption_bps));
  h.refill.append(QPointF(t, refill));
  while (h.consumption.size() > 300) h.consumption.removeFirst();  // 5 minutes at 1 Hz
  while (h.refill.size() > 300) h.refill.removeFirst();
}

void MainWindow::redraw() {
  std::vector<QString> keys;
  if (!selected_supply_.isEmpty() && history_.count(selected_supply_)) {
    keys.push_back(selected_supply_);
  } else {
    for (const auto& [key, h] : history_)
      if (!key.contains('|')) keys.push_back(key);
  }
  chart_->setTitle(selected_supply_.isEmpty()
                       ? "Key consumption and refill per site (bit/s, last 5 minutes)"
                       : "Key consumption and refill of " +
                             QString(selected_supply_).replace('|', ' ') +
                             " (bit/s, last 5 minutes)");
  for (auto it = shown_.begin(); it != shown_.end();) {
    if (std::find(keys.begin(), keys.end(), it->first) == keys.end()) {
      chart_->removeSeries(it->second.first);
      chart_->removeSeries(it->second.second);
      delete it->second.first;
      delete it->second.second;
      it = shown_.erase(it);
    } else {
      ++it;
    }
  }
  double top = 1000, latest = 10;
  for (const auto& key : keys) {
    auto& pair = shown_[key];
    if (!pair.first) {
      const QString label = QString(key).replace('|', ' ');
      pair.first = new QLineSeries();
      pair.first->setName(label + " consumption");
      pair.second = new QLineSeries();
      pair.second->setName(label + " refill");
      for (auto* series : {pair.first, pair.second}) {
        chart_->addSeries(series);
        series->attachAxis(x_axis_);
        series->attachAxis(y_axis_);
      }
    }
    const History& h = history_[key];
    pair.first->replace(h.consumption);
    pair.second->replace(h.refill);
    for (const auto* points : {&h.consumption, &h.refill}) {
      for (const auto& p : *points) top = std::max(top, p.y());
      if (!points->isEmpty()) latest = std::max(latest, points->last().x());
    }
  }
  x_axis_->setRange(std::max(0.0, latest - 300), latest);
  y_axis_->setRange(0, top * 1.1);
}

void MainWindow::job_action(const QString& action) {
  const QModelIndexList selected =
      job_view_->selectionModel() ? job_view_->selectionModel()->selectedRows() : QModelIndexList();
  if (selected.isEmpty()) {
    statusBar()->showMessage("Select a job first", 5000);
    return;
  }
  const int row = selected.first().row();
  const QString id = jobs_.job_at(row).value("job_id").toString();
  const QString service_url = jobs_.service_of(row);
  ServicePoller* service = nullptr;
  for (auto* s : services_)
    if (s->base().toString() == service_url) service = s;
  if (!service) return;
  auto report = [this, action, id](int status, const QString& error) {
    statusBar()->showMessage(status >= 200 && status < 300
                                 ? action + " " + id + ": done"
                                 : action + " " + id + " refused: " +
                                       (error.isEmpty() ? QString::number(status) : error),
                             10000);
  };
  if (action == "delete") {
    if (confirm_deletes &&
        QMessageBox::question(
            this, "Delete job",
            "Delete job " + id + " and what this site wrote for it? Source data is kept.") !=
            QMessageBox::Yes) {
      return;
    }
    service->remove("/api/v1/jobs/" + id, report);
  } else {
    service->post("/api/v1/jobs/" + id + "/" + action, QJsonObject{}, report);
  }
}

void MainWindow::update_service_label() {
  QStringList parts;
  for (auto* s : services_)
    parts << QString("%1 %2").arg(s->base().authority(), s->up() ? "up" : "DOWN");
  services_label_->setText(parts.join("   "));
}

}  // namespace otpgate::console
