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
#include <QLocale>
#include <QMenuBar>
#include <QMessageBox>
#include <QPainter>
#include <QPushButton>
#include <QSplitter>
#include <QStatusBar>
#include <QStyledItemDelegate>
#include <QTabWidget>
#include <QVBoxLayout>
#include <cmath>
#include <utility>

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

  // Key per link: the links' table over a chart of their refill and consumption; each
  // stream's own key supply one tab away.
  auto* keys_page = new QSplitter(Qt::Vertical, tabs);
  link_view_ = table(&links_, keys_page);
  chart_ = new QChart();
  chart_->setLocalizeNumbers(true);
  x_axis_ = new QCategoryAxis(chart_);
  x_axis_->setLabelsPosition(QCategoryAxis::AxisLabelsPositionOnValue);
  x_axis_->setRange(-300, 0);
  for (int minutes = 5; minutes >= 1; --minutes)
    x_axis_->append(QString("%1 min ago").arg(QLocale().toString(minutes)), -60.0 * minutes);
  x_axis_->append("now", 0);
  y_axis_ = new QCategoryAxis(chart_);
  y_axis_->setLabelsPosition(QCategoryAxis::AxisLabelsPositionOnValue);
  chart_->addAxis(x_axis_, Qt::AlignBottom);
  chart_->addAxis(y_axis_, Qt::AlignLeft);
  // Selecting a link charts it; selecting nothing charts every link.
  connect(link_view_->selectionModel(), &QItemSelectionModel::selectionChanged, this, [this] {
    const QModelIndexList rows = link_view_->selectionModel()->selectedRows();
    selected_link_.clear();
    if (!rows.isEmpty()) {
      const auto& r = links_.rows().at(std::size_t(rows.first().row()));
      selected_link_ = r.site + "|" + r.stream + "|" + r.direction;
    }
    redraw();
  });
  auto* chart_view = new QChartView(chart_, keys_page);
  chart_view->setRenderHint(QPainter::Antialiasing);
  chart_view->setMinimumHeight(220);
  keys_page->addWidget(link_view_);
  keys_page->addWidget(chart_view);
  tabs->addTab(keys_page, "Key per link");

  auto* key_view = table(&key_supplies_, tabs);
  key_view->setItemDelegateForColumn(KeySupplyModel::ready, new GaugeDelegate(key_view));
  connect(&key_supplies_, &QAbstractItemModel::modelReset, key_view, [key_view] {
    key_view->setColumnWidth(KeySupplyModel::ready,
                             std::max(key_view->columnWidth(KeySupplyModel::ready), 120));
  });
  tabs->addTab(key_view, "Key per stream");

  tabs->addTab(table(&streams_, tabs), "Streams");
  tabs->addTab(table(&calls_, tabs), "Calls");

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
  auto* services_menu = menuBar()->addMenu("&Services");
  services_menu->addAction("&Edit services...", this, &MainWindow::edit_services);
  services_menu->addAction("&Quit", qApp, &QApplication::quit);
  services_label_ = new QLabel(this);
  statusBar()->addPermanentWidget(services_label_);
  resize(1200, 720);
}

void MainWindow::add_service(ServicePoller::Kind kind, const QUrl& url, int poll_ms) {
  add_service(ServiceEntry{kind, url, {}, {}}, poll_ms);
}

void MainWindow::set_services(const QList<ServiceEntry>& services, int poll_ms) {
  for (auto* s : services_) delete s;
  services_.clear();
  links_.clear();
  key_supplies_.clear();
  streams_.clear();
  calls_.clear();
  jobs_.clear();
  history_.clear();
  selected_link_.clear();
  redraw();
  for (const auto& e : services) add_service(e, poll_ms);
  update_service_label();
}

void MainWindow::start_from(QSettings* settings, int poll_ms) {
  settings_ = settings;
  poll_ms_ = poll_ms;
  const QList<ServiceEntry> services = load_services(*settings);
  if (services.isEmpty()) {
    statusBar()->showMessage("No services yet: add a gateway or a transfer service");
    edit_services();
    return;
  }
  set_services(services, poll_ms);
}

void MainWindow::edit_services() {
  if (services_dialog_) {
    services_dialog_->raise();
    return;
  }
  QList<ServiceEntry> current;
  for (auto* s : services_) current << ServiceEntry{s->kind(), s->base(), s->user(), s->password()};
  services_dialog_ = new ServicesDialog(current, this);
  services_dialog_->setAttribute(Qt::WA_DeleteOnClose);
  connect(services_dialog_, &QDialog::accepted, this, [this] {
    const QList<ServiceEntry> chosen = services_dialog_->services();
    if (settings_) save_services(*settings_, chosen);
    set_services(chosen, poll_ms_);
  });
  connect(services_dialog_, &QObject::destroyed, this, [this] { services_dialog_ = nullptr; });
  services_dialog_->open();  // window-modal, never blocks the event loop
}

void MainWindow::add_service(const ServiceEntry& entry, int poll_ms) {
  const ServicePoller::Kind kind = entry.kind;
  const QUrl url = entry.url;
  auto* service = new ServicePoller(kind, url, this);
  service->set_credentials(entry.user, entry.password);
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

void MainWindow::on_gateway(ServicePoller* service, const QJsonObject& status) {
  const QString health = status.value("health").toObject().value("status").toString();
  if (std::exchange(health_[service], health) != health) update_service_label();
  links_.update_site(status);
  key_supplies_.update_site(status);
  streams_.update_site(status);
  calls_.update_site(status);
  alerts_.check_gateway(status.value("site").toString(), status);
  const QString site = status.value("site").toString();
  const qint64 now = QDateTime::currentMSecsSinceEpoch();
  for (const auto& row : links_.rows()) {
    if (row.site == site)
      record(row.site + "|" + row.stream + "|" + row.direction, row.consumption_bps, row.refill_bps,
             now);
  }
  redraw();
}

void MainWindow::record(const QString& key, double consumption_bps, double refill_bps, qint64 now) {
  History& h = history_[key];
  const double t = double(now - started_ms_) / 1000;
  h.consumption.append(QPointF(t, consumption_bps));
  h.refill.append(QPointF(t, refill_bps));
  while (h.consumption.size() > 300) h.consumption.removeFirst();  // 5 minutes at 1 Hz
  while (h.refill.size() > 300) h.refill.removeFirst();
}

void MainWindow::redraw() {
  std::vector<QString> keys;
  if (!selected_link_.isEmpty() && history_.count(selected_link_)) {
    keys.push_back(selected_link_);
  } else {
    for (const auto& [key, h] : history_) keys.push_back(key);
  }
  chart_->setTitle(selected_link_.isEmpty()
                       ? "Key refill and consumption per link (last 5 minutes)"
                       : "Key refill and consumption of " +
                             QString(selected_link_).replace('|', ' ') + " (last 5 minutes)");
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
  const double latest = double(QDateTime::currentMSecsSinceEpoch() - started_ms_) / 1000;
  double top = 0;
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
    // Seconds before now on the x axis.
    for (const auto& [points, series] :
         {std::pair{&h.consumption, pair.first}, std::pair{&h.refill, pair.second}}) {
      QList<QPointF> shifted;
      for (const auto& p : *points) {
        shifted.append(QPointF(p.x() - latest, p.y()));
        top = std::max(top, p.y());
      }
      series->replace(shifted);
    }
  }
  set_rate_axis(top);
}

void MainWindow::set_rate_axis(double top_bps) {
  // Round ticks in one unit the top value reads best in: "0 Mbit/s" ... "2.5 Mbit/s".
  const double limit = std::max(top_bps * 1.1, 1000.0);
  const double step = tick_step(limit);
  const int ticks = int(std::ceil(limit / step - 1e-9));
  const RateUnit unit = rate_unit(step * ticks);
  for (const QString& label : y_axis_->categoriesLabels()) y_axis_->remove(label);
  for (int i = 0; i <= ticks; ++i) y_axis_->append(human_rate(step * i, unit), step * i);
  y_axis_->setRange(0, step * ticks);
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

QString MainWindow::services_text() const {
  return services_label_->text();
}

void MainWindow::update_service_label() {
  QStringList parts;
  for (auto* s : services_)
    // A gateway that answers but says it is unhealthy is not "up" to an operator.
    parts << QString("%1 %2").arg(s->base().authority(), !s->up()                    ? "DOWN"
                                                         : health_[s] == "unhealthy" ? "UNHEALTHY"
                                                         : health_[s] == "degraded"  ? "degraded"
                                                                                     : "up");
  services_label_->setText(parts.join("   "));
}

}  // namespace otpgate::console
